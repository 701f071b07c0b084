"""Reading JSON Lines files, with errors that name the file and the line.

Owns: `jsonl_values(lines, where, source)`, the JSON value of every non-blank line of a stream, and
`read_jsonl(path)`, which yields `("FILE:LINE", object)` for every non-blank line of a UTF-8 JSONL file ('-'
reads stdin) and raises `InvalidInputError` naming the file (missing or unreadable) or the file and line (not
UTF-8, not JSON, not a JSON object). Lines end at '\\n' only, so a U+2028 inside a JSON string, or a lone CR
(JSON whitespace), does not split its line; each line is decoded alone, so a byte that is not UTF-8 is named
by its own line. Must not know: what the objects mean (each caller validates its own fields), argparse,
gRPC, Celery.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from model.errors import InvalidInputError

STDIN = "-"


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) per non-blank line; `where` is "FILE:LINE" (1-based; "<stdin>:LINE" for '-')."""
    name = "<stdin>" if str(path) == STDIN else str(path)
    for n, obj in jsonl_values(_lines(path, name), lambda n: f"{name}:{n}", name):
        if not isinstance(obj, dict):
            raise InvalidInputError(f"must be a JSON object, got {_json_type(obj)}", field=f"{name}:{n}")
        yield f"{name}:{n}", obj


def jsonl_values(
    lines: Iterable[bytes | str], where: Callable[[int], str], source: str
) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) per non-blank line of `lines`: a binary file or stream (whose iteration
    splits at b"\\n" only), or text lines (a StringIO as stdin); numbers are 1-based. A byte order mark before
    the first line is not part of it. A line that is not UTF-8 or not JSON is an `InvalidInputError` naming
    `where(n)`; a read that fails (EIO, a vanished network mount) one naming `source`, after which line."""
    it, n = iter(lines), 0
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except OSError as e:
            raise InvalidInputError(f"cannot read after line {n} ({e.strerror or e})", field=source) from None
        n += 1
        if isinstance(raw, str):
            line = raw.removeprefix("\ufeff") if n == 1 else raw
        else:
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                why = f"not valid UTF-8 ({e.reason} at byte {e.start})"
                raise InvalidInputError(why, field=where(n)) from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
            deep = not isinstance(e, json.JSONDecodeError)
            why = "nested too deeply to parse" if deep else f"{e.msg}, column {e.colno}"
            raise InvalidInputError(f"not valid JSON ({why})", field=where(n)) from None
        yield n, value


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
