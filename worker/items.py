"""Job items checked at submission, so a bad job is refused before anything is queued.

Owns: turning raw items into the canonical dicts a job stores (`text`, `role`, and `id`/`context` only when
present), with the engine's item rules and the edge limit on characters (`model.items`, shared with the
engine and the gRPC servicer). Must not know: Redis, Celery, torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from model.errors import InvalidInputError
from model.items import check_item, fields_of


def normalize_item(raw: Any, index: int, *, max_text_chars: int) -> dict[str, str]:
    """One raw item -> a canonical dict. Raises InvalidInputError(index=index, field=...) naming the first
    offending field."""
    f = fields_of(raw, index)
    check_item(f, index, max_text_chars)
    out = {"text": f.text, "role": f.role}
    if f.context is not None:
        out["context"] = f.context
    if f.id is not None:
        out["id"] = f.id
    return out


def normalize_items(items: Iterable[Any], *, max_text_chars: int) -> list[dict[str, str]]:
    """Every item normalized, or InvalidInputError for the first bad one; an empty job is refused."""
    out = [normalize_item(raw, i, max_text_chars=max_text_chars) for i, raw in enumerate(items)]
    if not out:
        raise InvalidInputError("a job needs at least one item", field="items")
    return out
