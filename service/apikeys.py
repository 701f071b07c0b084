"""The API keys `safety serve` accepts: from SAFETY_API_KEY (one or more, comma-separated) or from the file
SAFETY_API_KEY_FILE (one per line), which is re-read when it changes so keys rotate without a restart.

Owns: the key syntax (each key stripped of surrounding ASCII whitespace; none empty, every character
printable ASCII, as gRPC metadata must be, none whitespace or a comma), `parse_keys` and `read_key_file`
(their ValueErrors name the entry or line, never the key; asked to, they log a warning, without the key,
for a key shorter than MIN_KEY_CHARS), and
`ApiKeys`, whose `matches(credentials)` compares with `hmac.compare_digest` against every key and, for a
key file, looks at the file (service/watch.py's signature) at most once per `RECHECK_S` and re-reads it when
it changed (a bad line in a re-read file is skipped with a warning and the other lines apply, so a key
removed in the same change is revoked; a file that became unreadable or holds no good key keeps the last good
keys and logs a warning, once per change; at start-up any bad line is an error). Must not know: gRPC, the
settings dataclass, how a caller sends its key.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable

from service import watch

log = logging.getLogger("safety.service")

RECHECK_S = 1.0  # a key file is looked at no more often than this
MIN_KEY_CHARS = 16  # a shorter key is accepted, with a warning: it may be guessed
ASCII_WHITESPACE = " \t\n\r\v\f"  # stripped around a key; str.strip() would also strip U+00A0, U+2028, ...


def _printable_ascii(c: str) -> bool:
    return " " <= c <= "~"


def _checked(keys: Iterable[tuple[str, str]], warn: str | None = None) -> tuple[str, ...]:
    """(where, raw key) -> the keys stripped of ASCII whitespace, refusing empty ones, ones with a character
    that is not printable ASCII (gRPC metadata is ASCII: no client could send such a key), and ones with
    whitespace or a comma inside. `warn`: where the keys come from, to log a warning (naming `where`, never
    the key) for each key shorter than MIN_KEY_CHARS; None: no warning (a check of the settings)."""
    out = []
    for where, raw in keys:
        key = raw.strip(ASCII_WHITESPACE)
        if not key:
            raise ValueError(f"{where} is empty")
        if not all(_printable_ascii(c) or c in ASCII_WHITESPACE for c in key):
            raise ValueError(
                f"{where} has a character that is not printable ASCII (gRPC metadata is ASCII, so no client "
                "could send this key; it is not shown)"
            )
        if any(c in ASCII_WHITESPACE or c == "," for c in key):
            raise ValueError(f"{where} contains whitespace or a comma inside the key")
        if warn is not None and len(key) < MIN_KEY_CHARS:
            log.warning(
                "%s: API key %s has %d characters, fewer than %d, and may be guessed; use a long random key "
                "(openssl rand -hex 32)", warn, where, len(key), MIN_KEY_CHARS,
            )  # fmt: skip
        out.append(key)
    return tuple(out)


def parse_keys(value: str, *, warn: str | None = None) -> tuple[str, ...]:
    """'k1, k2\\n' -> ('k1', 'k2'): comma-separated keys, each stripped (a Secret made from an echo'd file
    ends in a newline); an empty entry is refused. `warn`: the setting's name, to warn of short keys."""
    return _checked(((f"key {i}", raw) for i, raw in enumerate(value.split(","), 1)), warn)


def read_key_file(path: str, *, warn: bool = False, skip_bad: bool = False) -> tuple[str, ...]:
    """The keys of a key file: one per line (a line ends at '\\n', '\\r\\n' or '\\r' only: a U+2028 or U+0085
    is refused as part of a key, not taken for a line end), surrounding ASCII whitespace stripped, blank
    lines and lines starting with '#' ignored. An unreadable file or one without a key raises ValueError.
    `warn`: log a warning for each short key. A bad line (a key that is not printable ASCII, or that has
    whitespace or a comma inside) raises ValueError; with `skip_bad` (a re-read), it is left out instead,
    with a warning naming the file and line, never the key, so that the file's other lines still apply."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM an editor wrote is not part of the first key
            lines = f.read().split("\n")  # text mode has made '\r\n' and '\r' into '\n'; splitlines() would
            # also split at U+2028, U+0085, ...
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{path}: cannot read ({reason})") from None
    entries = [(f"{path} line {n}", line) for n, line in enumerate(lines, 1)]
    wanted = [(where, line) for where, line in entries if line.strip(ASCII_WHITESPACE)[:1] not in ("", "#")]
    if skip_bad:
        good = []
        for where, line in wanted:
            try:
                _checked([(where, line)])
            except ValueError as e:
                log.warning("SAFETY_API_KEY_FILE: %s; that line is skipped, the file's other keys apply", e)
            else:
                good.append((where, line))
        wanted = good
    keys = _checked(wanted, "SAFETY_API_KEY_FILE" if warn else None)
    if not keys:
        raise ValueError(f"{path}: no key in it (one key per line; blank lines and '#' comments are ignored)")
    return keys


class ApiKeys:
    """The accepted keys, fixed (`ApiKeys(keys)`) or read from a file (`ApiKeys.from_file(path)`)."""

    def __init__(self, keys: Iterable[str], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = tuple(k.encode() for k in keys)
        self._path: str | None = None
        self._signature: watch.Signature = ()  # of the file when last read, good or bad
        self._clock = clock
        self._checked_at = 0.0

    @classmethod
    def from_file(cls, path: str, *, clock: Callable[[], float] = time.monotonic) -> ApiKeys:
        """Keys from `path` (ValueError when it is unreadable or holds none), re-read when it changes."""
        signature = watch.signature(path)
        keys = cls(read_key_file(path, warn=True), clock=clock)
        keys._path, keys._signature, keys._checked_at = path, signature, clock()
        return keys

    def matches(self, credentials: bytes) -> bool:
        """Is `credentials` one of the keys? Compared with every key in constant time per key."""
        if self._path is not None:
            self._refresh()
        return any([hmac.compare_digest(credentials, key) for key in self._keys])  # a list: compare with all

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked_at < RECHECK_S:
            return
        self._checked_at = now
        path = self._path
        assert path is not None
        signature = watch.signature(path)
        if signature == self._signature:
            return  # unchanged since it was last read (a bad file is not read again until it changes)
        self._signature = signature
        try:
            keys = read_key_file(path, warn=True, skip_bad=True)
        except ValueError as e:  # unreadable, or no good key in it
            log.warning("SAFETY_API_KEY_FILE: %s; keeping the %d keys read before", e, len(self._keys))
            return
        self._keys = tuple(k.encode() for k in keys)
        log.info("SAFETY_API_KEY_FILE re-read", extra={"path": path, "keys": len(keys)})
