"""Item validation at submission: the same verdicts as the engine's `coerce_items`, plus the edge limits."""

from __future__ import annotations

from typing import Any

import pytest

from model.errors import InvalidInputError
from worker.items import iter_normalized, normalize_item

CASES: list[Any] = [
    {"text": "hello"},
    {"text": "hello", "id": "a1"},
    {"text": "answer", "role": "response", "context": "question"},
    {"text": "answer", "role": "response"},
    {"text": "x", "role": None},
    {"text": "x", "role": ""},
    {"text": "x", "context": ""},
    {"text": "x", "role": "prompt", "context": None},
    {"text": "   "},
    {"text": ""},
    {"text": 5},
    {"text": None},
    {"id": "no text"},
    {"text": "x", "role": "system"},
    {"text": "x", "context": "only on responses"},
    {"text": "x", "role": "response", "context": 3},
    {"text": "x", "id": 7},
    {"text": "x", "label": "unknown field"},
    ["not", "an", "object"],
    "a bare string",
    None,
]


def verdict(fn: Any) -> tuple[str, str | None]:
    try:
        fn()
    except InvalidInputError as e:
        return "error", e.field
    return "ok", None


@pytest.mark.parametrize("case", CASES, ids=[repr(c)[:40] for c in CASES])
def test_agrees_with_the_engine(case: Any, tiny_classifier: Any) -> None:
    ours = verdict(lambda: normalize_item(case, 0, max_text_chars=1000))
    engine = verdict(lambda: tiny_classifier.coerce_items([case]))
    assert ours == engine


def test_normalized_items_classify_like_the_raw_ones(tiny_classifier: Any) -> None:
    raw = [{"text": "a", "role": None, "id": "1"}, {"text": "b", "role": "response", "context": "q"}]
    normalized = list(iter_normalized(raw, max_text_chars=100))
    assert normalized == [
        {"text": "a", "role": "prompt", "id": "1"},
        {"text": "b", "role": "response", "context": "q", "id": "1"},  # an id always: its index
    ]
    assert [r.to_dict() for r in tiny_classifier.classify(normalized)] == [
        r.to_dict() for r in tiny_classifier.classify(raw)
    ]


def test_first_bad_item_is_named_by_index_and_field() -> None:
    items = [{"text": "fine"}] * 3 + [{"text": "x", "role": "bot"}] + [{"text": ""}]
    with pytest.raises(InvalidInputError) as e:
        list(iter_normalized(items, max_text_chars=100))
    assert (e.value.index, e.value.field) == (3, "role")
    assert str(e.value).startswith("items[3].role:")


@pytest.mark.parametrize("field", ["text", "context"])
def test_character_limit_applies_to_text_and_context(field: str) -> None:
    item = {"text": "ok", "role": "response", "context": "ok"} | {field: "y" * 11}
    with pytest.raises(InvalidInputError) as e:
        normalize_item(item, 4, max_text_chars=10)
    assert (e.value.index, e.value.field) == (4, field)
    assert "11 characters, the limit is 10" in str(e.value)
    assert normalize_item(item | {field: "y" * 10}, 4, max_text_chars=10)[field] == "y" * 10


def test_an_empty_job_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="at least one item") as e:
        list(iter_normalized([], max_text_chars=10))
    assert e.value.field == "items"
