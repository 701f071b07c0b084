"""Item validation at submission: the same verdicts as the engine's `coerce_items`, plus the edge limits."""

from __future__ import annotations

from collections import UserString
from collections.abc import Iterator, Mapping
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


def test_a_role_that_is_not_a_string_is_refused_even_if_it_equals_one() -> None:
    """A UserString("prompt") compares equal to "prompt": it passed the check, then failed as a TypeError
    where the item is written out (only the Python API can send one)."""
    for item in ({"text": "x", "role": UserString("prompt")}, {"text": "x", "role": UserString("response")}):
        with pytest.raises(InvalidInputError, match="must be one of") as e:
            normalize_item(item, 0, max_text_chars=1000)
        assert e.value.field == "role"


def test_an_empty_job_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="at least one item") as e:
        list(iter_normalized([], max_text_chars=10))
    assert e.value.field == "items"


class FrozenMapping(Mapping[str, Any]):
    """A mapping that is not a dict (a gRPC front end or a library caller may hand one over)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize(
    ("raw", "field", "said"),
    [
        ({"text": ""}, "text", "must not be empty"),
        ({"text": "\u200b"}, "text", "must not be blank"),  # only an invisible separator
        ({"text": " \ufeff\u200d\n\u2060 "}, "text", "must not be blank"),  # whitespace and invisibles
        ({"text": "\u200b\u200c hidden"}, None, None),  # invisibles first, then something to read
        ({"text": "  padded  \u200b"}, None, None),
        ({"text": "caf\u00e9"}, None, None),
        ({"text": "x\ud800"}, "text", "lone surrogate '\\ud800' at character 1"),
        ({"text": "\u00e9", "id": "\udcff"}, "id", "lone surrogate '\\udcff' at character 0"),
        ({"text": "a", "role": "response", "context": "\u00e9\ud83d"}, "context", "lone surrogate"),
        ({"text": "x", "zeta": 1, "alpha": 2}, "alpha", "unknown field(s) ['alpha', 'zeta']"),
        (FrozenMapping({"text": "x", "extra": 1}), "extra", "unknown field(s) ['extra']"),
        (FrozenMapping({"text": "from a mapping"}), None, None),
    ],
)
def test_the_quick_paths_of_the_checks_give_the_full_checks_verdicts(
    raw: Any, field: str | None, said: str | None
) -> None:
    """blank, check_unicode and fields_of skip work for the usual item (a dict, ASCII, text that starts with
    something to read): an item off those paths still gets the full check's verdict."""
    if field is None:
        assert normalize_item(raw, 2, max_text_chars=100)["text"] == raw["text"]
        return
    with pytest.raises(InvalidInputError) as e:
        normalize_item(raw, 2, max_text_chars=100)
    assert (e.value.index, e.value.field) == (2, field)
    assert said is not None and said in str(e.value)
