"""Pure validation of job items, so a bad job is refused at submission, before anything is queued.

Owns: the item rules of the engine's `Classifier.coerce_items` (fields id, text, role, context; roles
"prompt" and "response"; context only on responses), restated without torch, plus the edge limit on
characters per text and per context. A test keeps the two in agreement. Must not know: Redis, Celery, torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from model.errors import InvalidInputError

FIELDS = ("id", "text", "role", "context")
ROLES = ("prompt", "response")


def normalize_item(raw: Any, index: int, *, max_text_chars: int) -> dict[str, str]:
    """One raw item -> a canonical dict (`text`, `role`, and `id`/`context` only when present).

    Raises InvalidInputError(index=index, field=...) naming the first offending field.
    """
    if not isinstance(raw, Mapping):
        raise InvalidInputError(f"must be an object, got {type(raw).__name__}", index=index, field="item")
    unknown = sorted(set(raw) - set(FIELDS), key=str)
    if unknown:
        raise InvalidInputError(f"unknown field(s) {unknown}", index=index, field=str(unknown[0]))
    if "text" not in raw:
        raise InvalidInputError("is required", index=index, field="text")
    text, role, context, item_id = (
        raw["text"],
        raw.get("role") or "prompt",
        raw.get("context") or None,
        raw.get("id"),
    )
    if not isinstance(text, str):
        raise InvalidInputError(f"must be a string, got {type(text).__name__}", index=index, field="text")
    if not text.strip():
        raise InvalidInputError("must not be empty", index=index, field="text")
    if len(text) > max_text_chars:
        raise InvalidInputError(
            f"has {len(text)} characters, the limit is {max_text_chars} (SAFETY_MAX_TEXT_CHARS)",
            index=index,
            field="text",
        )
    if role not in ROLES:
        raise InvalidInputError(f"must be one of {ROLES}, got {role!r}", index=index, field="role")
    out = {"text": text, "role": role}
    if context is not None:
        if not isinstance(context, str):
            raise InvalidInputError(
                f"must be a string, got {type(context).__name__}", index=index, field="context"
            )
        if role == "prompt":
            raise InvalidInputError("is only allowed on role 'response'", index=index, field="context")
        if len(context) > max_text_chars:
            raise InvalidInputError(
                f"has {len(context)} characters, the limit is {max_text_chars} (SAFETY_MAX_TEXT_CHARS)",
                index=index,
                field="context",
            )
        out["context"] = context
    if item_id is not None:
        if not isinstance(item_id, str):
            raise InvalidInputError(
                f"must be a string, got {type(item_id).__name__}", index=index, field="id"
            )
        out["id"] = item_id
    return out


def normalize_items(items: Iterable[Any], *, max_text_chars: int) -> list[dict[str, str]]:
    """Every item normalized, or InvalidInputError for the first bad one; an empty job is refused."""
    out = [normalize_item(raw, i, max_text_chars=max_text_chars) for i, raw in enumerate(items)]
    if not out:
        raise InvalidInputError("a job needs at least one item", field="items")
    return out
