"""When a call of `safety classify --remote` goes again, after how long, and what it says meanwhile.

Owns: `Retries`, the retries of one call (the server's Info, or one Classify request): RESOURCE_EXHAUSTED
with the server's retry hint (its queue is full) after that hint; UNAVAILABLE (nothing listens yet, the
server is starting, loading its model, draining or restarting) after the server's hint if it sent one,
else after a capped exponential backoff with jitter; both at most RETRIES times and never past the call's
deadline (`--timeout`, counted from the call's first try, which every try shares). Nothing else is retried:
DEADLINE_EXCEEDED, INVALID_ARGUMENT, UNAUTHENTICATED…, a RESOURCE_EXHAUSTED without a hint (gRPC's own
message size limit, not the server's queue), nor an UNAVAILABLE that is a failed TLS handshake (a TLS
mismatch: trying again cannot mend it). Each retry is a line on stderr; giving up is a note for the final
message saying what was retried and why it stopped. Must not know: the requests (the caller sends them).
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter

import grpc

from service.client import retry_after_ms

# A call goes again at most RETRIES times. After RESOURCE_EXHAUSTED, each time after the server's hint (at
# most 5 s from `safety serve`: the scheduler's RETRY_MAX_MS) or WAIT_MAX_S, whichever is less: a run gives
# up on a server that stays full within about 40 s (80 s at most, whatever the hints), or when --timeout
# runs out first. After UNAVAILABLE without a hint: BACKOFF_FIRST_S, doubled each time up to BACKOFF_MAX_S,
# each within JITTER of that (so that many clients a restart turned away do not come back in step): about
# 20 s over the 8 retries, within the default --timeout of 30 s.
RETRIES = 8
WAIT_MAX_S = 10.0
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 4.0
JITTER = 0.2
# The channel's own reconnect backoff (gRPC's default: from 1 s, growing 1.6 times up to 120 s), set to keep
# up with the retries': while it lasts, a call fails at once with the last connection error without trying
# to connect, so that a retry after the server came back would find out only at the channel's next attempt.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", int(BACKOFF_FIRST_S * 1000)),
    ("grpc.max_reconnect_backoff_ms", int(BACKOFF_MAX_S * 1000)),
)


def pause(seconds: float) -> None:
    """Wait before sending a call again (the tests replace it)."""
    time.sleep(seconds)


def tls_mismatch(error: grpc.RpcError) -> bool:
    """Is this UNAVAILABLE a TLS handshake that failed (a plaintext call to a TLS port, a server that wants a
    client certificate, a certificate not trusted), which no retry mends? gRPC words it "Tls handshake
    failed", or "Socket closed" when the server closed the connection during the handshake."""
    message = error.details() or ""
    return message.startswith("failed to connect") and (
        "handshake failed" in message.lower() or message.endswith("Socket closed")
    )


class Retries:
    """The retries of one call: `target` (HOST:PORT, for the lines on stderr), `again` (what a retry does,
    as the lines say it: "sending items[0..3] again"), `timeout` (the call's deadline in seconds, counted
    from now, shared by every try; None: none)."""

    def __init__(self, target: str, again: str, timeout: float | None) -> None:
        self.target, self.again, self.timeout = target, again, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.done = 0  # retries so far
        self.waited = 0.0  # seconds paused before them
        self.codes: Counter[str] = Counter()  # the status codes retried, and how often
        self.backoff = BACKOFF_FIRST_S

    def time_left(self) -> float | None:
        """The deadline of the next try: what is left of the call's timeout (None: no deadline)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def after(self, error: grpc.RpcError) -> str | None:
        """After a try that failed with `error`: pause and return None when the call should go again (saying
        so on stderr); else return the note for the final message ("" when nothing was retried and there
        is nothing to add): why it gave up, and what it retried before."""
        code = error.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (hint := retry_after_ms(error)) is not None:
            wait, busy, state = min(hint / 1000, WAIT_MAX_S), "the server is busy", "refused"
            advice = "retry later, or use a batch job (safety submit)"
        elif code == grpc.StatusCode.UNAVAILABLE and not tls_mismatch(error):
            hint = retry_after_ms(error)
            wait = self._backoff() if hint is None else min(hint / 1000, WAIT_MAX_S)
            busy, state, advice = "the server is unavailable", "unavailable", "retry later"
        else:
            return self._before()
        if self.done == RETRIES:
            return f"still {state} after {RETRIES} retries over {self.waited:.1f} s: {advice}"
        if self.deadline is not None and time.monotonic() + wait >= self.deadline:
            late = f"a retry in {wait:.2f} s would come after --timeout ({self.timeout:g} s) ran out"
            if not self.done:
                return f"not retried: {late}; {advice}, or pass a longer --timeout"
            return (
                f"still {state} after {self.done} retries over {self.waited:.1f} s, and {late}: {advice}, or "
                "pass a longer --timeout"
            )
        self.done += 1
        self.codes[code.name] += 1
        print(
            f"safety classify --remote {self.target}: {busy} ({code.name}: {error.details()}); {self.again} "
            f"in {wait:.2f} s (retry {self.done} of {RETRIES})",
            file=sys.stderr,
            flush=True,
        )
        pause(wait)
        self.waited += wait
        return None

    def _backoff(self) -> float:
        """The pause before the next retry of an UNAVAILABLE without a hint: the backoff (doubled for the
        next one, up to BACKOFF_MAX_S), within JITTER of it."""
        base, self.backoff = self.backoff, min(self.backoff * 2, BACKOFF_MAX_S)
        return base * random.uniform(1 - JITTER, 1 + JITTER)

    def _before(self) -> str:
        """The note of a call that failed for good with an error not retried, after retries of others (a
        DEADLINE_EXCEEDED once the retries had used the timeout): what those were; "" after none."""
        if not self.done:
            return ""
        codes = ", ".join(f"{n} {code}" for code, n in self.codes.items())
        return f"after {self.done} retries ({codes}) over {self.waited:.1f} s"
