"""Job items checked at submission, so a bad job is refused before anything is queued.

Owns: turning raw items into the canonical dicts a job stores (`text`, `role`, `id`, and `context` only when
present), with the engine's item rules and the edge limit on characters (`model.items`, shared with the
engine and the gRPC servicer), one item at a time (`iter_normalized`: a job of millions of items is never
held whole). Must not know: Redis, Celery, torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from model.errors import InvalidInputError
from model.items import check_item, fields_of, item_id


def normalize_item(raw: Any, index: int, *, max_text_chars: int) -> dict[str, str]:
    """One raw item -> a canonical dict. Raises InvalidInputError(index=index, field=...) naming the first
    offending field. The id is always set, by the product rule (`model.items.item_id`: the item's own, else
    its index in the job as a string), so the same items give the same stored job, and the same digest
    (resume), from every front end: a gRPC item's empty id, a JSON item's missing, null or empty one."""
    f = fields_of(raw, index)
    check_item(f, index, max_text_chars)
    out = {"text": f.text, "role": f.role}
    if f.context is not None:
        out["context"] = f.context
    out["id"] = item_id(f.id, index)
    return out


def iter_normalized(items: Iterable[Any], *, max_text_chars: int) -> Iterator[dict[str, str]]:
    """Each item normalized as `items` yields it, or InvalidInputError for the first bad one (when it is
    reached: the caller must not act on the items before the last one came out); an empty job is refused
    once `items` is exhausted."""
    index = -1
    for index, raw in enumerate(items):
        yield normalize_item(raw, index, max_text_chars=max_text_chars)
    if index < 0:
        raise InvalidInputError("a job needs at least one item", field="items")
