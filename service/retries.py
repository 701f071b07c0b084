"""When a call of `safety classify --remote` goes again, after how long, and what it says meanwhile.

Owns: `Retries`, the retries of one call (the server's Info, or one Classify request): RESOURCE_EXHAUSTED
with the server's retry hint (its queue is full) after that hint; UNAVAILABLE (nothing listens yet, the
server is starting, loading its model, draining or restarting; a proxy, port-forward or load balancer that
accepts the connection and closes it, having no server behind it yet) after the server's hint if it sent
one, else after a capped exponential backoff with jitter; CANCELLED (gRPC core cancels calls a server
drowning in new ones cannot take, and a server draining or restarting may cut a call that way; the CLI
never cancels its own, and Classify is idempotent) as an UNAVAILABLE without a hint; all at most RETRIES
times and never past the call's deadline (`--timeout`, counted from the call's first try, which every try
shares). Nothing else is retried: DEADLINE_EXCEEDED, INVALID_ARGUMENT, UNAUTHENTICATED…, a
RESOURCE_EXHAUSTED without a hint (gRPC's own message size limit, not the server's queue), nor an
UNAVAILABLE that is a failed TLS handshake (a TLS mismatch: trying again cannot mend it). A plaintext call
that finds its connection closed ("Socket closed") is a TLS mismatch only if the port answers a TLS
handshake (`speaks_tls`, asked once per call); else it is retried like any UNAVAILABLE. Each retry is a
line on stderr; giving up is a note for the final message saying what was retried and why it stopped.
Must not know: the requests (the caller sends them).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable

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
# The channel's own reconnect backoff keeps up with these retries: the client's CHANNEL_OPTIONS
# (service/client.py) set it from BACKOFF_FIRST_S to BACKOFF_MAX_S instead of gRPC's default (from 1 s,
# growing 1.6 times up to 120 s), during which a call fails at once with the last connection error without
# trying to connect, so that a retry after the server came back would find out only at the channel's next
# attempt.


def pause(seconds: float) -> None:
    """Wait before sending a call again (the tests replace it)."""
    time.sleep(seconds)


# How long `speaks_tls` waits for the connection and for the server's side of the handshake.
PROBE_TIMEOUT_S = 1.0


def tls_mismatch(error: grpc.RpcError, serves_tls: Callable[[], bool | None] = lambda: None) -> bool:
    """Is this UNAVAILABLE a TLS handshake that failed (a plaintext call to a TLS port, a server that wants a
    client certificate, a certificate not trusted), which no retry mends? gRPC words it "Tls handshake
    failed", or "Socket closed" when the server closed the connection during the handshake. A plaintext
    call sees "Socket closed" too from anything that accepts a connection and closes it (docker-proxy before
    the container listens, kubectl port-forward, an L4 load balancer with no backend): for that one,
    `serves_tls()` decides (True: the port answers a TLS handshake; False: it does not, so a retry may find
    a server; None: not known, taken as a mismatch)."""
    message = error.details() or ""
    if not message.startswith("failed to connect"):
        return False
    if "handshake failed" in message.lower():
        return True
    return message.endswith("Socket closed") and serves_tls() is not False


def speaks_tls(target: str, timeout: float = PROBE_TIMEOUT_S) -> bool | None:
    """Does HOST:PORT answer a TLS handshake (no certificate checked, `h2` offered as gRPC does)? True when
    the handshake completes or the server answers it with a TLS alert (one that wants a client certificate);
    False when the connection is refused, closed or reset, times out, or gets something that is not TLS;
    None for a target that is not HOST:PORT (a `unix:` socket, a `dns:///` name), which it cannot probe."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target or not host:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=None if _is_address(host) else host),
        ):
            return True
    except ssl.SSLError as e:  # a TLS alert from the server is TLS; "wrong version number" etc. are not
        return "ALERT" in (e.reason or "").upper()
    except (OSError, ValueError):  # refused, reset, closed (SSLEOFError is an SSLError: above), timed out
        return False


def _is_address(host: str) -> bool:
    """An IP address (no SNI for it), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Retries:
    """The retries of one call: `target` (HOST:PORT, for the lines on stderr), `again` (what a retry does,
    as the lines say it: "sending items[0..3] again"), `timeout` (the call's deadline in seconds, counted
    from now, shared by every try; None: none), `tls` (whether the call uses TLS: a plaintext one that
    finds its connection closed asks `speaks_tls` whether that was a TLS port)."""

    def __init__(self, target: str, again: str, timeout: float | None, *, tls: bool = False) -> None:
        self.target, self.again, self.timeout, self.tls = target, again, timeout, tls
        self.serves_tls: bool | None = None  # what `speaks_tls` found, once asked (None: not asked)
        self._probed = False
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
        elif code == grpc.StatusCode.UNAVAILABLE and not tls_mismatch(error, self._serves_tls):
            hint = retry_after_ms(error)
            wait = self._backoff() if hint is None else min(hint / 1000, WAIT_MAX_S)
            busy, state, advice = "the server is unavailable", "unavailable", "retry later"
        elif code == grpc.StatusCode.CANCELLED:  # not by this client: a server draining, or gRPC core's
            wait = self._backoff()
            busy, state, advice = "the call was cancelled by the server", "unavailable", "retry later"
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

    def _serves_tls(self) -> bool | None:
        """For a plaintext call whose connection was closed: does the target speak TLS (`speaks_tls`, asked
        once, within what is left of the deadline)? A TLS call: None (its own handshake failed)."""
        if self.tls:
            return None
        if not self._probed:
            self._probed = True
            left = self.time_left()
            self.serves_tls = speaks_tls(
                self.target, PROBE_TIMEOUT_S if left is None else min(left, PROBE_TIMEOUT_S)
            )
        return self.serves_tls

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
