"""The API keys `safety serve` accepts: from SAFETY_API_KEY (one or more, comma-separated) or from the file
SAFETY_API_KEY_FILE (one per line), which is re-read when it changes so keys rotate without a restart.

Owns: the key syntax (each key stripped of surrounding whitespace; none empty, none with whitespace or a
comma inside), `parse_keys` and `read_key_file` (their ValueErrors name the entry or line, never the key), and
`ApiKeys`, whose `matches(credentials)` compares with `hmac.compare_digest` against every key and, for a
key file, looks at the file (service/watch.py's signature) at most once per `RECHECK_S` and re-reads it when
it changed (a file that became unreadable or empty keeps the last good keys and logs a warning, once per
change). Must not know: gRPC, the settings dataclass, how a caller sends its key.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable

from service import watch

log = logging.getLogger("safety.service")

RECHECK_S = 1.0  # a key file is looked at no more often than this


def _checked(keys: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """(where, raw key) -> the stripped keys, refusing empty ones and whitespace or commas inside."""
    out = []
    for where, raw in keys:
        key = raw.strip()
        if not key:
            raise ValueError(f"{where} is empty")
        if any(c.isspace() or c == "," for c in key):
            raise ValueError(f"{where} contains whitespace or a comma inside the key")
        out.append(key)
    return tuple(out)


def parse_keys(value: str) -> tuple[str, ...]:
    """'k1, k2\\n' -> ('k1', 'k2'): comma-separated keys, each stripped (a Secret made from an echo'd file
    ends in a newline); an empty entry is refused."""
    return _checked((f"key {i}", raw) for i, raw in enumerate(value.split(","), 1))


def read_key_file(path: str) -> tuple[str, ...]:
    """The keys of a key file: one per line, surrounding whitespace stripped, blank lines and lines starting
    with '#' ignored. An unreadable file or one without a key raises ValueError."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM an editor wrote is not part of the first key
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{path}: cannot read ({reason})") from None
    entries = [(f"{path} line {n}", line) for n, line in enumerate(lines, 1)]
    keys = _checked((where, line) for where, line in entries if line.strip()[:1] not in ("", "#"))
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
        keys = cls(read_key_file(path), clock=clock)
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
            keys = read_key_file(path)
        except ValueError as e:
            log.warning("SAFETY_API_KEY_FILE: %s; keeping the %d keys read before", e, len(self._keys))
            return
        self._keys = tuple(k.encode() for k in keys)
        log.info("SAFETY_API_KEY_FILE re-read", extra={"path": path, "keys": len(keys)})
