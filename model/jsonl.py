"""Reading JSON Lines files, with errors that name the file and the line.

Owns: `read_jsonl(path)`, which yields `("FILE:LINE", object)` for every non-blank line of a UTF-8 JSONL file
('-' reads stdin) and raises `InvalidInputError` naming the file (missing or unreadable) or the file and
line (not UTF-8, not JSON, not a JSON object). Lines end at '\\n' only, so a U+2028 inside a JSON string does
not split its line. Must not know: what the objects mean (each caller validates its own fields), argparse,
gRPC, Celery.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model.errors import InvalidInputError

STDIN = "-"


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) per non-blank line; `where` is "FILE:LINE" (1-based; "<stdin>:LINE" for '-')."""
    name = "<stdin>" if str(path) == STDIN else str(path)
    for n, raw in enumerate(_lines(path, name), 1):
        where = f"{name}:{n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            raise InvalidInputError(f"not valid UTF-8 ({e.reason} at byte {e.start})", field=where) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
            why = e if isinstance(e, json.JSONDecodeError) else "nested too deeply to parse"
            raise InvalidInputError(f"not valid JSON ({why})", field=where) from None
        if not isinstance(obj, dict):
            raise InvalidInputError(f"must be a JSON object, got {_json_type(obj)}", field=where)
        yield where, obj


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _lines(path: str | Path, name: str) -> Iterator[bytes | str]:
    # Binary file iteration splits at b"\n" only (str.splitlines would also split at U+2028, U+0085, ...);
    # the "\r" of a CRLF file is JSON whitespace.
    if str(path) == STDIN:
        yield from getattr(sys.stdin, "buffer", sys.stdin)  # bytes from a real stdin, str from a StringIO
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; an open error must become InvalidInputError)
    except FileNotFoundError:
        raise InvalidInputError("file not found", field=name) from None
    except OSError as e:
        raise InvalidInputError(f"cannot read ({e.strerror})", field=name) from None
    with f:
        yield from f
