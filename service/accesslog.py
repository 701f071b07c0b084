"""The access log: a line per call on the `safety.access` logger, and the limit on its failed calls' lines.

Owns: which calls get a line (`ACCESS_LOG_MODES`: none, those that did not end OK, all), the line's fields,
and `LineLimit`, the rate limit on the lines of failed calls. A server refuses calls far faster than it
serves them (RESOURCE_EXHAUSTED at admission, a wrong API key, a client retrying in a loop), so during an
overload `errors` would write a line per refusal; the lines of calls that ended OK are bounded by what the
server can serve and are never limited. Lines over the limit are counted by status code and summarised in
one warning, at most once a second: before the next line written once one is due, else by a timer on the
event loop a second after the refusal that started the count, and at the drain. Every call is still counted
by method and code in `safety_requests_total` (service/metrics.py, which calls `AccessLog.call`). Must not
know: gRPC, the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextvars import Context

from service.settings import ACCESS_LOG_MODES

access_log = logging.getLogger("safety.access")
SUMMARY_EVERY_S = 1.0  # at most one "lines left out" summary a second


class LineLimit:
    """At most `rate` lines a second, in bursts of up to one second's worth (a token bucket, full at the
    start); the lines refused are counted by status code until `left_out` hands them over. Pure: the caller
    passes the time (seconds, monotonic)."""

    def __init__(self, rate: float) -> None:
        assert rate > 0, rate
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.tokens = self.burst
        self.at: float | None = None
        self.refused: Counter[str] = Counter()
        self.first = self.last = 0.0  # when the first and the last line now in `refused` were refused
        self.summarised = float("-inf")  # when `left_out` last handed lines over

    def allow(self, now: float, code: str) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        if not self.refused:
            self.first = now
        self.last = now
        self.refused[code] += 1
        return False

    def left_out(self, now: float, final: bool = False) -> tuple[dict[str, int], float] | None:
        """The lines refused since the last hand-over, by code, and the seconds from the first of them to
        the last; None when there were none, or (unless `final`) when the last hand-over was under
        SUMMARY_EVERY_S ago: they are kept for the next."""
        if not self.refused or (not final and now - self.summarised < SUMMARY_EVERY_S):
            return None
        refused = dict(self.refused)
        self.refused.clear()
        self.summarised = now
        return refused, self.last - self.first


class AccessLog:
    """`mode` off, errors or all; `rate`: the most lines a second for calls that did not end OK (0: no
    limit). Called on the server's event loop only. `clock`: time.monotonic, but in tests."""

    def __init__(self, mode: str, rate: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        assert mode in ACCESS_LOG_MODES, mode
        assert rate >= 0, rate
        self.mode = mode
        self.limit = LineLimit(rate) if rate > 0 and mode != "off" else None
        self.clock = clock
        self._timer: asyncio.TimerHandle | None = None  # the summary of lines left out, when none is written

    @property
    def silenced(self) -> bool:
        """On, but its INFO lines are dropped by the logger's level (SAFETY_LOG_LEVEL=WARNING or above)."""
        return self.mode != "off" and not access_log.isEnabledFor(logging.INFO)

    def call(self, method: str, code: str, seconds: float | None, peer: str | Callable[[], str]) -> None:
        """A call ended: its line, if the mode writes one and the limit allows it, after the summary of the
        lines left out if one is due. `seconds`: the call's time from its request's arrival (None: it ended
        before its request arrived); `peer`, or a function giving it, called only for a line. Nothing when
        the logger drops INFO (SAFETY_LOG_LEVEL=WARNING): no line, so none counted as left out."""
        ok = code == "OK"
        if self.mode == "off" or (self.mode == "errors" and ok) or self.silenced:
            return
        if self.limit is not None:
            now = self.clock()
            if not ok and not self.limit.allow(now, code):
                self._flush_later(SUMMARY_EVERY_S)
                return
            self._summary(self.limit.left_out(now))
        ms = None if seconds is None else round(seconds * 1000, 2)
        peer = peer() if callable(peer) else peer
        access_log.info("call", extra={"method": method, "code": code, "ms": ms, "peer": peer})

    def close(self) -> None:
        """The server stops: the summary of the lines left out since the last one, if any. Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.limit is not None:
            self._summary(self.limit.left_out(self.clock(), final=True))

    def _flush_later(self, delay: float) -> None:
        """A summary in `delay` seconds, unless one is already due to come (outside an event loop: none)."""
        if self._timer is None:
            # no running loop (tests): the next line written, or close(), brings the summary
            with contextlib.suppress(RuntimeError):  # an empty context: the summary has no call's request id
                self._timer = asyncio.get_running_loop().call_later(delay, self._flush, context=Context())

    def _flush(self) -> None:
        self._timer = None
        assert self.limit is not None
        now = self.clock()
        self._summary(self.limit.left_out(now))
        if self.limit.refused:  # a summary went out under a second ago: the rest when the second is up
            self._flush_later(max(0.0, self.limit.summarised + SUMMARY_EVERY_S - now))

    def _summary(self, left: tuple[dict[str, int], float] | None) -> None:
        if left is None:
            return
        assert self.limit is not None  # only a limit leaves lines out
        by_code, over_s = left
        access_log.warning(
            "access log: %d lines of failed calls left out over %.2f s (at most %g a second are written)",
            sum(by_code.values()), over_s, self.limit.rate,
            extra={"left_out": by_code, "over_s": round(over_s, 3)},
        )  # fmt: skip
