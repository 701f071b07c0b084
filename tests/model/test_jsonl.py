"""model.jsonl: JSON Lines with errors that name the file and the line, shared by classify, train and eval."""

from __future__ import annotations

import errno
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.errors import InvalidInputError
from model.jsonl import jsonl_values, read_jsonl


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_objects_with_their_line_numbers_blank_lines_skipped(tmp_path: Path) -> None:
    f = write(tmp_path / "in.jsonl", b'{"a": 1}\n\n   \n{"b": "x"}\r\n{"c": [1]}')  # CRLF, no final newline
    assert list(read_jsonl(f)) == [(f"{f}:1", {"a": 1}), (f"{f}:4", {"b": "x"}), (f"{f}:5", {"c": [1]})]
    assert list(read_jsonl(str(f))) == list(read_jsonl(f))


def test_only_newline_ends_a_line(tmp_path: Path) -> None:
    # U+2028 and U+0085 are line breaks to str.splitlines() but legal inside a JSON string.
    text = "para\u2028graph\u0085end"
    f = write(tmp_path / "u.jsonl", (json.dumps({"text": text}, ensure_ascii=False) + "\n{}\n").encode())
    assert list(read_jsonl(f)) == [(f"{f}:1", {"text": text}), (f"{f}:2", {})]


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    f = write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"text": "hi"}\n')
    assert list(read_jsonl(f)) == [(f"{f}:1", {"text": "hi"})]


@pytest.mark.parametrize(
    ("data", "where", "problem"),
    [
        (b'{"ok": 1}\n{"text": \n', ":2", "not valid JSON (Expecting value"),
        (b'\n\n["a list"]\n', ":3", "must be a JSON object, got an array"),
        (b'{"ok": 1}\n"text"\n', ":2", "must be a JSON object, got a string"),
        (b"null\n", ":1", "must be a JSON object, got null"),
        (b'{"ok": 1}\n{"text": "\xff"}\n', ":2", "not valid UTF-8"),
    ],
)
def test_bad_lines_name_the_file_line_and_problem(
    tmp_path: Path, data: bytes, where: str, problem: str
) -> None:
    f = write(tmp_path / "bad.jsonl", data)
    with pytest.raises(InvalidInputError) as e:
        list(read_jsonl(f))
    assert e.value.field == f"{f}{where}"
    assert str(e.value).startswith(f"{f}{where}: {problem}"), str(e.value)


def test_lines_before_a_bad_one_are_yielded_first(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.jsonl", b'{"n": 1}\n{"n": 2}\nnope\n')
    got = []
    with pytest.raises(InvalidInputError, match=r"bad\.jsonl:3: not valid JSON"):
        for _, obj in read_jsonl(f):
            got.append(obj["n"])
    assert got == [1, 2]


def test_a_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InvalidInputError) as e:
        list(read_jsonl(missing))
    assert (e.value.field, str(e.value)) == (str(missing), f"{missing}: file not found")
    with pytest.raises(InvalidInputError, match=rf"^{tmp_path}: cannot read \("):
        list(read_jsonl(tmp_path))  # a directory


def test_dash_reads_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "a"}\n\n{"text": "b"}\n'))
    assert list(read_jsonl("-")) == [("<stdin>:1", {"text": "a"}), ("<stdin>:3", {"text": "b"})]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"x": 1}\n[2]\n'), encoding="utf-8"))
    with pytest.raises(InvalidInputError, match=r"^<stdin>:2: must be a JSON object"):
        list(read_jsonl("-"))


def test_train_and_eval_read_through_it(tmp_path: Path) -> None:
    """Callers keep their messages: line-level ones come from read_jsonl, field-level ones are theirs."""
    from model.evaluate import read_entries
    from model.train import read_rows

    f = write(tmp_path / "d.jsonl", b'{"text": "ok", "labels": []}\n\n[1]\n')
    for read in (read_rows, read_entries):
        with pytest.raises(InvalidInputError, match=r"d\.jsonl:3: must be a JSON object"):
            read(f)
        with pytest.raises(InvalidInputError, match=r"nope\.jsonl: file not found"):
            read(tmp_path / "nope.jsonl")
    write(f, b'{"text": "ok", "labels": []}\n\n{"text": "x", "labels": "hate"}\n')
    for read in (read_rows, read_entries):
        with pytest.raises(InvalidInputError, match=r"d\.jsonl:3\.labels: must be a list"):
            read(f)
    write(f, '{"text": "a\u2028b", "labels": []}\n'.encode())
    assert read_rows(f)[0].item.text == "a\u2028b" and read_entries(f)[0].item["text"] == "a\u2028b"
    write(f, b"\n\n")
    for read in (read_rows, read_entries):
        with pytest.raises(InvalidInputError, match=r"d\.jsonl: has no items"):
            read(f)


def test_a_line_nested_too_deeply_is_refused_by_its_line(tmp_path: Path) -> None:
    """200,000 '[' raised RecursionError out of json.loads: a traceback instead of the line's error."""
    f = write(tmp_path / "deep.jsonl", b'{"text": "fine"}\n' + b"[" * 200_000 + b"\n")
    with pytest.raises(InvalidInputError) as err:
        list(read_jsonl(f))
    assert str(err.value) == f"{f}:2: not valid JSON (nested too deeply to parse)"


def test_a_read_that_fails_midway_is_named_with_the_last_line_read() -> None:
    """A read error (EIO, a vanished network mount) after some lines names the source and the line it came
    after; `safety classify --jsonl` let the bare OSError out, `safety submit` had its own wording."""

    def lines() -> Iterator[bytes]:
        yield b'{"n": 1}\n'
        yield b"\n"
        raise OSError(errno.EIO, "Input/output error")

    values = jsonl_values(lines(), lambda n: f"f.jsonl line {n}", "f.jsonl")
    assert next(values) == (1, {"n": 1})
    with pytest.raises(InvalidInputError) as err:
        next(values)
    assert (err.value.field, str(err.value)) == (
        "f.jsonl",
        "f.jsonl: cannot read after line 2 (Input/output error)",
    )


def test_json_errors_give_the_column_and_values_need_not_be_objects() -> None:
    """jsonl_values, what `safety submit` reads its items with, leaves the item's checks to the caller."""
    values = jsonl_values([b'["a list"]\n', b'{"text": tru}\n'], lambda n: f"in line {n}", "in")
    assert next(values) == (1, ["a list"])
    with pytest.raises(InvalidInputError) as err:
        next(values)
    assert str(err.value) == "in line 2: not valid JSON (Expecting value, column 10)"
