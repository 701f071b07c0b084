"""The rules of an item, in one place and without torch, for every front end.

Owns: an item's fields (id, text, role, context), their defaults (role "prompt"; a missing, null or empty
context or role is unset, any other value is checked; a result's id is the item's, else its index as a
string: `item_id`), the roles, the context-only-on-responses rule, valid Unicode (no lone surrogates: JSON's
`\ud800` escapes, or a command-line argument that was not UTF-8), and the optional edge limit on characters
per text and per context, each broken rule an `InvalidInputError` naming the item's index and field. The
engine (`Classifier.coerce_items`), the job client (`worker.items`), the gRPC servicer and the Python client
(`FIELDS`) all use these, so a bad item gets the same verdict and message wherever it arrives. Must not
know: torch, gRPC, Celery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from model.errors import InvalidInputError

FIELDS = ("id", "text", "role", "context")
_FIELD_SET = frozenset(FIELDS)
ROLES = ("prompt", "response")
LIMIT_SETTING = "SAFETY_MAX_TEXT_CHARS"


def unset_or(value: Any, default: Any) -> Any:
    """`default` for a role or context that is missing, null or empty; anything else as given (checked later:
    0, False or [] is a wrong type, not "unset")."""
    return default if value is None or (isinstance(value, str) and not value) else value


class Fields(NamedTuple):
    text: Any
    role: Any
    context: Any
    id: Any


def fields_of(raw: Any, index: int) -> Fields:
    """A raw item (a mapping) -> its four fields with defaults applied; unknown fields and a missing text
    are refused. The values are checked by `check_item`."""
    if type(raw) is not dict and not isinstance(raw, Mapping):  # a dict (parsed JSON) skips the ABC check
        raise InvalidInputError(f"must be an object, got {type(raw).__name__}", index=index, field="")
    if not _FIELD_SET.issuperset(raw):
        unknown = sorted(set(raw) - _FIELD_SET, key=str)
        raise InvalidInputError(f"unknown field(s) {unknown}", index=index, field=str(unknown[0]))
    if "text" not in raw:
        raise InvalidInputError("is required", index=index, field="text")
    return Fields(
        raw["text"], unset_or(raw.get("role"), "prompt"), unset_or(raw.get("context"), None), raw.get("id")
    )


def item_id(given: str | None, index: int) -> str:
    """The id a result carries, whatever the front end: the item's own, else (missing, null or empty) its
    index in the request or job, as a string."""
    return given if given else str(index)


def check_length(value: str, index: int, field: str, max_chars: int | None) -> None:
    if max_chars is not None and len(value) > max_chars:
        message = f"has {len(value)} characters, the limit is {max_chars} ({LIMIT_SETTING})"
        raise InvalidInputError(
            message, index=index, field=field, limit=max_chars, value=len(value), setting=LIMIT_SETTING
        )


# Characters that only join, separate or mark text, with nothing to read: zero-width space, non-joiner and
# joiner, word joiner, BOM. Not every format character (Unicode category Cf): tag characters (U+E0020-7F)
# spell hidden instructions ("ASCII smuggling"), and bidi overrides reorder what is shown; those are scored.
INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff")
# What a text that is not empty but blank is told (an empty one: "must not be empty").
BLANK = "must not be blank: only whitespace and zero-width characters, nothing to score"


def blank(text: str) -> bool:
    """Empty, or only whitespace and the invisible separators of INVISIBLE: no content to score."""
    stripped = text.strip()  # strips what isspace() calls whitespace: its first character is not
    if not stripped:
        return True
    if stripped[0] not in INVISIBLE:  # the usual text: a first character with something to read
        return False
    return all(c.isspace() or c in INVISIBLE for c in stripped)


def check_unicode(value: str, index: int | None, field: str) -> None:
    """A Python str may hold lone surrogates (JSON's "\ud800", `surrogateescape` argv): no UTF-8 for them,
    and the tokenizer, Redis and protobuf all refuse such a string."""
    if value.isascii():  # no surrogate in it: nothing to encode
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        message = f"has a lone surrogate {value[e.start]!r} at character {e.start}; it must be valid Unicode"
        raise InvalidInputError(message, index=index, field=field) from None


def check_item(f: Fields, index: int, max_chars: int | None = None) -> None:
    """The value rules, in the order their errors are reported; `max_chars` None: no edge limit."""
    if not isinstance(f.text, str):
        raise InvalidInputError(f"must be a string, got {type(f.text).__name__}", index=index, field="text")
    if not f.text:
        raise InvalidInputError("must not be empty", index=index, field="text")
    if blank(f.text):
        raise InvalidInputError(BLANK, index=index, field="text")
    check_length(f.text, index, "text", max_chars)
    check_unicode(f.text, index, "text")
    if not isinstance(f.role, str) or f.role not in ROLES:  # a UserString("prompt") equals "prompt"
        raise InvalidInputError(f"must be one of {ROLES}, got {f.role!r}", index=index, field="role")
    if f.context is not None:
        if not isinstance(f.context, str):
            raise InvalidInputError(
                f"must be a string, got {type(f.context).__name__}", index=index, field="context"
            )
        if f.role == "prompt":
            raise InvalidInputError("is only allowed on role 'response'", index=index, field="context")
        check_length(f.context, index, "context", max_chars)
        check_unicode(f.context, index, "context")
    if f.id is not None:
        if not isinstance(f.id, str):
            raise InvalidInputError(f"must be a string, got {type(f.id).__name__}", index=index, field="id")
        check_unicode(f.id, index, "id")
