"""API keys: the key syntax, key files, and a key file re-read when it changes (with a fake clock)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from service.apikeys import RECHECK_S, ApiKeys, parse_keys, read_key_file


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str, mtime_s: int) -> None:
    """Write `text` and set a distinct modification time (a coarse file system may not tick in between)."""
    path.write_text(text)
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))


def test_keys_are_stripped_and_split_on_commas() -> None:
    assert parse_keys("k1-secret\n") == ("k1-secret",)  # a Secret made from an echo'd file
    assert parse_keys(" k1 ,k2,\tk3 ") == ("k1", "k2", "k3")


@pytest.mark.parametrize(
    ("value", "why"),
    [("k1,,k2", "key 2 is empty"), ("\n", "key 1 is empty"), ("k1,", "key 2 is empty"),
     ("good,bad key", "key 2 contains whitespace")],
)  # fmt: skip
def test_bad_keys_are_refused_without_showing_them(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as err:
        parse_keys(value)
    assert "bad key" not in str(err.value) and "good" not in str(err.value)


@pytest.mark.parametrize(
    "value",
    ["k1\u00a0", "\u00a0k1", "k\u00e9y-long-enough-here", "key\x01with-a-control", "k\u2028k", "k1\x7f"],
    ids=["nbsp-after", "nbsp-before", "non-ascii", "control", "line-separator", "del"],
)
def test_a_key_that_is_not_printable_ascii_is_refused_without_showing_it(value: str, tmp_path: Path) -> None:
    """gRPC metadata is ASCII: such a key loaded, but no client could ever send it. Before, `k1\u00a0` was
    silently shortened to `k1` (str.strip() strips non-ASCII whitespace too), and the others loaded."""
    with pytest.raises(ValueError, match="key 2 has a character that is not printable ASCII") as err:
        parse_keys(f"good-key,{value}")
    assert value.strip() not in str(err.value) and "good-key" not in str(err.value)
    path = tmp_path / "keys"
    path.write_text(f"# keys\ngood-key\n{value}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path} line 3 has a character that is not printable ASCII") as err:
        read_key_file(str(path))
    assert value.strip() not in str(err.value) and "good-key" not in str(err.value)


def test_only_ascii_whitespace_is_stripped(tmp_path: Path) -> None:
    assert parse_keys(" \t k1-secret-k1-secret \r\n") == ("k1-secret-k1-secret",)
    path = tmp_path / "keys"
    path.write_bytes(b"k1\rk2\r\nk3\n")  # CR, CRLF and LF line ends: three keys
    assert read_key_file(str(path)) == ("k1", "k2", "k3")


def test_a_short_key_is_accepted_with_a_warning_that_does_not_show_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "safety.service")
    assert parse_keys("s3cret,0123456789abcdef") == ("s3cret", "0123456789abcdef")  # a settings check: quiet
    assert not caplog.records
    parse_keys("s3cret,0123456789abcdef", warn="SAFETY_API_KEY")
    [warning] = caplog.records
    assert warning.getMessage().startswith(
        "SAFETY_API_KEY: API key key 1 has 6 characters, fewer than 16, and may be guessed"
    )
    path = tmp_path / "keys"
    path.write_text("0123456789abcdef\nk2\n")
    caplog.clear()
    ApiKeys.from_file(str(path))
    [warning] = caplog.records
    assert f"API key {path} line 2 has 2 characters" in warning.getMessage()
    assert all("s3cret" not in r.getMessage() and "k2\n" not in r.getMessage() for r in caplog.records)


def test_key_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-11\n\nk-new\n  k-old  \r\n   # k-retired\n")
    assert read_key_file(str(path)) == ("k-new", "k-old")


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "no key in it"), ("# only a comment\n\n", "no key in it"), ("k1\nk 2\n", "line 2 contains")],
)
def test_a_key_file_without_usable_keys_is_refused(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=why):
        read_key_file(str(path))
    with pytest.raises(ValueError, match=r"missing: cannot read \(No such file"):
        read_key_file(str(tmp_path / "missing"))


def test_any_of_the_keys_matches() -> None:
    keys = ApiKeys(["k1", "k2"])
    assert keys.matches(b"k1") and keys.matches(b"k2")
    assert not keys.matches(b"k3") and not keys.matches(b"k1k2") and not keys.matches(b"")


def test_a_changed_key_file_is_re_read_at_most_once_per_recheck_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = tmp_path / "keys", Clock()
    write(path, "k1\n", 1_000)
    keys = ApiKeys.from_file(str(path), clock=clock)
    assert keys.matches(b"k1") and not keys.matches(b"k2")

    write(path, "k2\n# k1 retired\n", 2_000)
    clock.now += RECHECK_S / 2
    assert keys.matches(b"k1"), "looked at the file again before the recheck interval"
    clock.now += RECHECK_S
    assert keys.matches(b"k2") and not keys.matches(b"k1")

    caplog.set_level(logging.WARNING, "safety.service")
    caplog.clear()  # the warnings that k1 and k2 are short keys
    path.unlink()  # unreadable now: the last good keys stay, with one warning
    for _ in range(3):
        clock.now += RECHECK_S
        assert keys.matches(b"k2")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "SAFETY_API_KEY_FILE" in warnings[0].getMessage()

    write(path, "", 3_000)  # empty: the same
    clock.now += RECHECK_S
    assert keys.matches(b"k2")

    write(path, "k3\n", 4_000)  # usable again
    clock.now += RECHECK_S
    assert keys.matches(b"k3") and not keys.matches(b"k2")


def test_a_bad_line_in_a_re_read_key_file_is_skipped_and_the_rest_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotation that removes a revoked key and adds a new one with a stray NBSP: the revoked key stops
    matching (before, the whole re-read file was refused and the revoked key stayed accepted), the good new
    key matches, and the warning names the file and line, never the key. At start-up a bad line is still an
    error."""
    path, clock = tmp_path / "keys", Clock()
    revoked, kept, added = "revoked-key-0123456789", "kept-key-0123456789", "added-key-0123456789"
    write(path, f"{revoked}\n{kept}\n", 1_000)
    keys = ApiKeys.from_file(str(path), clock=clock)
    assert keys.matches(revoked.encode()) and keys.matches(kept.encode())

    caplog.set_level(logging.WARNING, "safety.service")
    write(path, f"{kept}\n{added}\u00a0\nsecond-added-key-0123456789\n", 2_000)
    clock.now += RECHECK_S
    assert not keys.matches(revoked.encode()), "the revoked key is still accepted"
    assert keys.matches(kept.encode()) and keys.matches(b"second-added-key-0123456789")
    assert not keys.matches(added.encode()) and not keys.matches(f"{added}\u00a0".encode())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{path} line 2" in w and "not printable ASCII" in w for w in warnings), warnings
    assert not any(added in w for w in warnings), "the warning shows the key"

    write(path, f"{added}\u00a0\n", 3_000)  # no good key left: the last good keys stay
    clock.now += RECHECK_S
    assert keys.matches(kept.encode())

    with pytest.raises(ValueError, match=f"{path} line 1 has a character that is not printable ASCII"):
        ApiKeys.from_file(str(path), clock=clock)
