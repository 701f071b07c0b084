"""Assembly and lifecycle of the gRPC server: `create_server` (bind) -> `start` (load, warm, SERVING) ->
`drain` (NOT_SERVING, finish in-flight calls within the grace period, stop; what is still in flight then is
cut, counted and logged). `serve` is the process: signals (SIGTERM/SIGINT drain, a second one stops at once;
SIGHUP re-checks the TLS files), logging, exit code.

Owns: grpc.aio server options (message limits, keepalive and ping-flood policy, connection idle time and
age), the cap on calls open at once (`CallCapInterceptor`: ours, not gRPC's `maximum_concurrent_rpcs`, so
that health checks always answer and a flood of health watches cannot take the slots of keyed calls), the
port's credentials (from service/tls.py, re-read as their files change), the interceptor chain (call cap
-> metrics -> errors -> API key, its keys from service/apikeys.py; the API key checked at each call's
start, before any of its request is read, and, for a stream, again at each request read or message sent),
grpc.health.v1 states, server reflection, the metrics HTTP exporter's lifetime, model loading and warm-up
off the event loop, and the one start-up line saying rich error details are off (service/richstatus.py).
Must not know: request parsing (servicer), batching (scheduler), status-code
choices (errors), how TLS files or key files are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from model import Classifier, Item, logs
from model.errors import SafetyError, TooManyCallsError, UnauthenticatedError
from service import requestid, richstatus
from service.accesslog import AccessLog
from service.apikeys import ApiKeys, parse_keys
from service.decoding import DecodeInterceptor, grpc_receive_limit
from service.errors import ErrorInterceptor, abort_for
from service.handlers import Memo, WrappingInterceptor, reading_its_request, with_behavior
from service.jobs import JobClientFactory
from service.metrics import Metrics, MetricsInterceptor
from service.scheduler import Scheduler
from service.servicer import SafetyServicer
from service.settings import ServeSettings
from service.stubs import SERVICE_NAME, pb2, pb2_grpc
from service.tls import ReloadingCredentials, TlsFiles

log = logging.getLogger("safety.service")
T = TypeVar("T")
ClassifierSource = Classifier | Callable[[], Classifier] | None
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_CHECK = HEALTH_PREFIX + "Check"  # never capped: the liveness/readiness probe must always answer
HEALTH_WATCH = HEALTH_PREFIX + "Watch"  # capped apart (SAFETY_MAX_HEALTH_WATCHES): needs no key, never ends
CAP_RETRY_MS = 1000  # the retry hint of a call refused by the cap on calls open at once
STOP_GRACE_S = 1.0  # after the drain: for calls that hold no work (health watches, reflection) to see the end
REVOKED = "API key revoked"  # how a stream whose key was removed from the key file ends (and the log says)


class ApiKeyInterceptor(WrappingInterceptor):
    """Every call except health checks (Kubernetes probes send no metadata) needs `authorization: Bearer
    <key>` with one of the accepted keys; others are refused with UnauthenticatedError's status code.

    A call is refused before any of its request is read: its key is in the call's metadata, which grpc has
    when it asks the interceptors for the call's handler, and a refused call gets a handler of the
    request-stream kind (`reading_its_request`) that aborts at once, so grpc neither waits for the request
    message (a call that never sends one is answered at once) nor receives or parses it (a 60 MiB message
    sent without a key costs the server no memory). Every interceptor outside this one leaves such a
    handler's requests unread: the metrics count the call UNAUTHENTICATED without reading it.

    A stream is held to its key while it runs, so that a key removed from the key file stops working on the
    streams it opened too (they have no maximum age, and long-lived ones usually no deadline): a stream of
    requests (ClassifyStream, reflection) compares its key with the current keys again as it reads each
    request, a server stream (StreamJobResults) before it sends each message. Once the key no longer
    matches, nothing more is read or sent: the handler ends as on any error reading its requests
    (ClassifyStream still sends the responses it owes) and the call ends UNAUTHENTICATED saying the key was
    revoked. The comparison is `ApiKeys.matches`: a constant-time compare with the keys in memory, which
    looks at the key file at most once a second for all calls together. Streams of another shape (a
    synchronous handler, or one that writes with `context.write()`; none of ours) are checked at their
    start only."""

    def __init__(self, keys: ApiKeys) -> None:
        super().__init__()
        self._keys = keys
        self._refusals = Memo()  # one refusal handler per method (self._memo: one held stream per method)

    def _authorized(self, metadata: Any) -> bool:
        credentials = _credentials(metadata)
        return credentials is not None and self._keys.matches(credentials)

    def handler_for(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Health checks as they are (Kubernetes probes send no metadata); a call without an accepted key
        refused before its request is read; a stream held to its key; any other call as it is."""
        if details.method.startswith(HEALTH_PREFIX):
            return handler
        if not self._authorized(details.invocation_metadata):
            return self._refusals.get(details.method, handler, lambda: reading_its_request(handler, _deny))
        return super().handler_for(handler, details)

    def applies(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> bool:
        """Wrap an accepted call's handler? Every stream held to its key."""
        return _held_to_its_key(handler) is not None

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        stream = _held_to_its_key(handler)
        assert stream is not None  # `applies`
        return with_behavior(handler, self._guarded(stream, method, handler.stream_stream is not None))

    def _guarded(
        self, behavior: Callable[..., AsyncIterator[Any]], method: str, streamed_requests: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        """`behavior` (an async generator) refused without the key, and ended when the key is revoked."""
        keys = self._keys

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            credentials = _credentials(context.invocation_metadata())
            if credentials is None or not keys.matches(credentials):  # revoked since `handler_for` looked
                await _deny(request, context)  # raises
                return
            held = _HeldKey(keys, credentials, method)
            sent = 0
            try:
                arg = _CheckedRequests(request, held) if streamed_requests else request
                async with contextlib.aclosing(behavior(arg, context)) as messages:
                    async for message in messages:
                        if not streamed_requests:  # a server stream: before each message it sends
                            held.check()
                        yield message
                        sent += 1
            except UnauthenticatedError:
                if not held.revoked:
                    raise
                error = UnauthenticatedError(
                    f"{REVOKED}: it is no longer one of the accepted keys (the key file changed while this "
                    f"stream was open); {sent} responses were sent on it. Continue on a new call with a "
                    "current key (`authorization: Bearer <key>`), resending what got no response"
                )
                await abort_for(error, context)

        return guarded


def _credentials(metadata: Any) -> bytes | None:
    """The key a call sends as `authorization: Bearer <key>` (None: no such header)."""
    for key, value in metadata or ():
        if key == "authorization":
            given = value.encode() if isinstance(value, str) else value
            scheme, _, credentials = given.partition(b" ")
            # RFC 7235: the scheme is case-insensitive
            return credentials if scheme.lower() == b"bearer" else None
    return None


def _held_to_its_key(handler: grpc.RpcMethodHandler) -> Callable[..., AsyncIterator[Any]] | None:
    """The behaviour of a stream that ApiKeyInterceptor can hold to its key as it runs: an async generator
    of requests (stream-stream) or of one request (unary-stream). None for any other handler."""
    stream = handler.stream_stream or handler.unary_stream
    return stream if stream is not None and inspect.isasyncgenfunction(stream) else None


class _HeldKey:
    """The key an open call was accepted with, compared with the accepted keys again by `check()`."""

    __slots__ = ("_credentials", "_keys", "method", "revoked")

    def __init__(self, keys: ApiKeys, credentials: bytes, method: str) -> None:
        self._keys, self._credentials, self.method = keys, credentials, method
        self.revoked = False

    def check(self) -> None:
        """UnauthenticatedError (and `revoked`) once the key is no longer accepted."""
        if not self.revoked and self._keys.matches(self._credentials):
            return
        if not self.revoked:
            self.revoked = True
            log.info("%s: an open stream ends", REVOKED, extra={"method": self.method})
        raise UnauthenticatedError(REVOKED)


class _CheckedRequests:
    """A call's request stream that hands on each request it reads only while the call's key is accepted,
    and raises UnauthenticatedError instead once it is not (the request read is dropped)."""

    __slots__ = ("_held", "_iterator", "_requests")

    def __init__(self, requests: AsyncIterable[Any], held: _HeldKey) -> None:
        self._requests, self._held = requests, held
        self._iterator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = aiter(self._requests)
        request = await anext(self._iterator)
        self._held.check()
        return request


async def _deny(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    """Abort the call UNAUTHENTICATED; `requests` (a request stream, or one request) is never read."""
    error = UnauthenticatedError("missing or wrong API key; send metadata `authorization: Bearer <key>`")
    await abort_for(error, context)


class CallCapInterceptor(WrappingInterceptor):
    """Outermost interceptor: the cap on calls open at once, in place of gRPC's `maximum_concurrent_rpcs`
    (one limit for every call, checked before any interceptor, so a flood of Health/Watch streams, which
    need no key and never end, would refuse keyed calls and the liveness probe alike, uncounted).

    `Health/Check` is never capped (a cheap unary probe that must always answer). `Health/Watch` streams
    count against their own cap (`max_watches`, SAFETY_MAX_HEALTH_WATCHES) and take no slot from anything
    else. Every other call (our service, reflection; each needs a key when keys are configured) counts
    against `max_calls` (SAFETY_MAX_CONCURRENT_RPCS). A call beyond its cap is refused at once, before any
    of its request is read (a handler of the request-stream kind that nobody reads), RESOURCE_EXHAUSTED with
    a retry hint (`grpc-retry-pushback-ms` of CAP_RETRY_MS, and RetryInfo), and counted in
    safety_requests_total by the metrics interceptor as any other call.

    A call counts from the moment grpc runs its handler until that handler returns or raises, however the
    call ends (answered, aborted, cancelled, out of time, cut by the drain): the handler it gets from the
    metrics interceptor is always of the request-stream kind, which grpc runs at once, and the count is
    released in a `finally`. The cap is checked when grpc asks for the call's handler, so calls whose handlers
    are asked for at the same moment may pass it together (by at most the few asked for on one turn of the
    event loop)."""

    def __init__(self, metrics: MetricsInterceptor, max_calls: int, max_watches: int) -> None:
        super().__init__()
        self._metrics = metrics
        self._caps = {"calls": max_calls, "watches": max_watches}
        self.open = {"calls": 0, "watches": 0}  # calls running now, by pool
        self._counted = Memo()
        self._refused = Memo()

    def handler_for(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Health checks as they are; a call beyond its pool's cap refused; any other call counted."""
        method = details.method
        if method == HEALTH_CHECK:
            return handler
        pool = "watches" if method == HEALTH_WATCH else "calls"
        if self.open[pool] >= self._caps[pool]:
            return self._refused.get(method, handler, lambda: self._refusal(handler, method, pool))
        return self._counted.get(method, handler, lambda: self._counting(handler, pool))

    def _counting(self, handler: grpc.RpcMethodHandler, pool: str) -> grpc.RpcMethodHandler:
        """`handler` counted in `pool` while it runs (a synchronous handler, none of ours: as it is)."""
        behavior = (
            handler.stream_unary or handler.stream_stream or handler.unary_unary or handler.unary_stream
        )
        open_calls = self.open
        if inspect.isasyncgenfunction(behavior):

            async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                open_calls[pool] += 1
                try:
                    async with contextlib.aclosing(behavior(requests, context)) as messages:
                        async for message in messages:
                            yield message
                finally:
                    open_calls[pool] -= 1

            return with_behavior(handler, stream)
        if inspect.iscoroutinefunction(behavior):

            async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                open_calls[pool] += 1
                try:
                    return await behavior(requests, context)
                finally:
                    open_calls[pool] -= 1

            return with_behavior(handler, call)
        return handler

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str, pool: str) -> grpc.RpcMethodHandler:
        """A handler that refuses the call without reading its request, counted by the metrics."""
        cap, what = self._caps[pool], "health watches" if pool == "watches" else "calls"
        setting = "SAFETY_MAX_HEALTH_WATCHES" if pool == "watches" else "SAFETY_MAX_CONCURRENT_RPCS"

        async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            error = TooManyCallsError(
                f"too many calls open at once: this server's cap of {what} open at once, {cap}, is reached "
                f"({setting}); retry with backoff",
                retry_after_ms=CAP_RETRY_MS,
            )
            await abort_for(error, context)

        return self._metrics.wrap(reading_its_request(handler, refuse), method.rsplit("/", 1)[-1])


UNLIMITED_MS = 2**31 - 1  # gRPC's "no limit" for its millisecond options (int32)
PING_STRIKES = 2  # too early pings tolerated, then GOAWAY too_many_pings (gRPC's default)


def _server_options(settings: ServeSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        # our own limit is checked where requests are parsed (service.decoding): INVALID_ARGUMENT, counted
        ("grpc.max_receive_message_length", grpc_receive_limit(settings.max_message_bytes)),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        # Gateways keep long-lived channels with keepalive pings; accept pings every 10 s (default: 5 min,
        # then GOAWAY too_many_pings). Faster pings still count as strikes: a ping flood is cut off.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", PING_STRIKES),
        # A connection that reaches its age takes no new calls (GOAWAY), but the calls open on it, long
        # ClassifyStreams and StreamJobResults included, are never cut: they end by their own deadline.
        ("grpc.max_connection_age_grace_ms", UNLIMITED_MS),
    ]
    if settings.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", settings.max_connection_idle_s * 1000))
    if settings.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", settings.max_connection_age_s * 1000))
    return options


def _in_daemon_thread(fn: Callable[[], T]) -> Awaitable[T]:
    """Run `fn` in a daemon thread (model loading must not keep a SIGTERMed process alive)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=target, name="safety-load", daemon=True).start()
    return future


def warm_up(clf: Classifier) -> float:
    """Before SERVING: a short and a longer text through the whole path once (tokenizer, allocators,
    kernels); a compiled network also runs every power-of-two bucket shape up to the longest window, so
    no request pays for compilation. Returns the seconds it took."""
    t0 = time.perf_counter()
    clf.classify([Item(text="warm up"), Item(text="warm up " * 200)])
    if clf.runner.compiled:
        clf.warmup()
    return time.perf_counter() - t0


@dataclass
class SafetyServer:
    settings: ServeSettings
    server: grpc.aio.Server
    port: int
    servicer: SafetyServicer
    health: Any
    metrics: Metrics
    source: ClassifierSource = None  # a loaded Classifier, a loader, or None: load from settings
    metrics_port: int | None = None
    classifier: Classifier | None = None
    scheduler: Scheduler | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    device_failed: asyncio.Event = field(default_factory=asyncio.Event)  # the device broke for good
    tls: ReloadingCredentials | None = None  # the served port's TLS files, re-read when they change
    cut: int = 0  # calls still in flight when the drain ended them (grace expired, or forced)
    _forced: asyncio.Event = field(default_factory=asyncio.Event)
    _interrupted: asyncio.Event = field(default_factory=asyncio.Event)  # a signal during the drain
    _failure_scrapes: int = 0  # the metrics registry's mark() when the device failed (0: never scraped)
    cap: CallCapInterceptor | None = None  # the cap on calls open at once (`cap.open`: the calls counted now)
    access: AccessLog | None = None  # the access log (a last summary of the lines it left out at the end)

    async def start(self) -> None:
        """Start serving (health NOT_SERVING), load and warm the model off the loop, then SERVING."""
        await self.server.start()
        log.info("listening", extra={"port": self.port, "metrics_port": self.metrics_port})
        s, source = self.settings, self.source
        if isinstance(source, Classifier):
            clf = source
        else:
            clf = await _in_daemon_thread(source or s.load)
            log.info("torch threads", extra={"threads": torch.get_num_threads()})
        seconds = await _in_daemon_thread(lambda: warm_up(clf))
        self.metrics.warmup_seconds.set(seconds)
        self.metrics.compiled.set(1 if clf.runner.compiled else 0)
        self.metrics.serving(clf.name, str(clf.device), str(clf.dtype))
        log.info("warmed up", extra={"seconds": round(seconds, 2), "compiled": clf.runner.compiled})
        self.classifier = clf
        loop = asyncio.get_running_loop()
        self.scheduler = Scheduler(
            clf,
            max_wait_ms=s.max_wait_ms,
            deadline_horizon_ms=s.deadline_horizon_ms,
            max_queue_tokens=s.max_queue_tokens,
            max_queue_items=s.max_queue_items,
            max_text_chars=s.max_text_chars,
            encode_threads=s.encode_threads,
            metrics=self.metrics,
            on_device_failure=lambda exc: loop.call_soon_threadsafe(self._device_broke),
        )
        self.servicer.attach(clf, self.scheduler)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, SERVING)
        log.info(
            "serving",
            extra={
                "model": clf.name,
                "revision": clf.revision,
                "device": clf.device,
                "dtype": clf.dtype,
                "backend": clf.backend,
                "labels": clf.labels,
                "max_batch_tokens": clf.limits.max_batch_tokens,
                "max_queue_tokens": self.scheduler.max_queue_tokens,
                "max_call_tokens": self.scheduler.max_call_tokens,
                "budget": clf.budget_text,
                "cuda_graphs": clf.graphs_text,
                "fused_gemm": clf.runner.fused_gemm,
                "auth": _auth_text(s),
                "tls": bool(s.tls_cert),
            },
        )

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING and UNAVAILABLE for new calls (the server still answers, so load balancers see the
        state), wait up to `grace` seconds for in-flight calls (classify calls, stream requests, job RPCs;
        open ClassifyStreams and job result streams end early, saying where to resume), then stop everything,
        giving what is left (health watches, reflection) at most STOP_GRACE_S. Idempotent. `force()` (a second
        signal) ends the wait at once. Calls still in flight at the end are cut (UNAVAILABLE): counted in
        `cut` and logged as a warning. After a device failure, /metrics stays up (within the grace) until a
        scrape has read the final counts (`_final_scrape`)."""
        if self._stopped.is_set():
            return
        loop = asyncio.get_running_loop()
        grace = self.settings.drain_grace_s if grace is None else grace
        deadline = loop.time() + grace
        log.info("draining", extra={"grace_s": grace, "in_flight": self.servicer.active})
        await self.health.enter_graceful_shutdown()
        self.servicer.start_draining()
        waits = {asyncio.ensure_future(self.servicer.idle.wait()), asyncio.ensure_future(self._forced.wait())}
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        self.cut = self.servicer.active
        if self.cut:
            why = "stopping at once (second signal)" if self._forced.is_set() else "drain grace expired"
            log.warning("%s: cutting %d calls still in flight", why, self.cut,
                        extra={"in_flight": self.cut, "grace_s": grace})  # fmt: skip
        # What is still open now never ends by itself (Health.Watch, a reflection stream): cut it short.
        stop_grace = 0.0 if self._forced.is_set() else min(STOP_GRACE_S, max(0.0, deadline - loop.time()))
        await self.server.stop(stop_grace)
        if self.access is not None:  # every call has ended: the last summary of the access lines left out
            self.access.close()
        if self.scheduler is not None:
            await loop.run_in_executor(None, self.scheduler.close)
        await loop.run_in_executor(None, self.servicer.jobs.close)
        if self.device_failed.is_set() and self.metrics_port is not None:
            await self._final_scrape(deadline)
        self.metrics.close()
        self._stopped.set()
        log.info("stopped")

    async def _final_scrape(self, deadline: float) -> None:
        """After a device failure, once the drain has ended every call, before /metrics goes: wait until a
        scrape begun from now on has read `safety_device_failed` = 1 and the final counts, at the latest
        until `deadline` (the drain grace). The process exits right after the drain, typically well under a
        second after the failure: without this Prometheus would most likely never see the failure, and
        SafetyDeviceFailed would not fire. A signal (`interrupt`, `force`) ends the wait, and a process whose
        /metrics was never scraped before the failure (`make run`, `docker run`, no Prometheus) does not
        wait: nothing would come, and its restart would only be delayed."""
        loop = asyncio.get_running_loop()
        registry = self.metrics.registry
        if self._failure_scrapes == 0:
            log.info("the device failed: /metrics was never scraped, so no final scrape is waited for")
            return
        mark = registry.mark()  # every call has ended: a scrape begun from now on reads the final counts
        scraped = asyncio.Event()
        registry.on_scrape = lambda: loop.call_soon_threadsafe(scraped.set)
        try:
            if not registry.scraped_since(mark):
                log.info(
                    "the device failed: waiting for a scrape of the final metrics",
                    extra={
                        "metrics_port": self.metrics_port,
                        "within_s": round(max(0.0, deadline - loop.time()), 1),
                    },
                )
            while not registry.scraped_since(mark):
                remaining = deadline - loop.time()
                if self._forced.is_set() or self._interrupted.is_set() or remaining <= 0:
                    why = "a signal" if remaining > 0 else "the drain grace expired"
                    log.warning("no scrape of the final metrics: %s", why)
                    return
                scraped.clear()  # set again (on this loop) by a collection that ends from now on
                waits = {
                    asyncio.ensure_future(scraped.wait()),
                    asyncio.ensure_future(self._forced.wait()),
                    asyncio.ensure_future(self._interrupted.wait()),
                }
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
            log.info("the final metrics were scraped")
        finally:
            registry.on_scrape = None

    def _device_broke(self) -> None:
        """On the loop, told by the scheduler once it has counted the failure's dropped windows:
        `safety_device_failed` = 1, and a scrape that begins from now on reads it and them."""
        self.metrics.device_failed.set(1)
        self._failure_scrapes = self.metrics.registry.mark()
        self.device_failed.set()

    def interrupt(self) -> None:
        """A signal during the drain (the first): the drain still finishes the calls in flight, but nothing
        else waits (the final scrape after a device failure)."""
        self._interrupted.set()

    def force(self) -> None:
        """Stop draining: cut what is still in flight now (a second SIGTERM/SIGINT)."""
        log.warning("second signal: stopping at once", extra={"in_flight": self.servicer.active})
        self._forced.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _auth_text(settings: ServeSettings) -> str:
    """How calls are authenticated, for the 'serving' log line (never a key)."""
    if settings.api_key_file:
        return f"API keys from SAFETY_API_KEY_FILE {settings.api_key_file}"
    if settings.api_key:
        return f"API keys from SAFETY_API_KEY ({len(settings.api_key.split(','))})"
    return "off"


def api_keys(settings: ServeSettings) -> ApiKeys | None:
    """The keys of SAFETY_API_KEY or SAFETY_API_KEY_FILE (None: no auth). The settings checked the file; an
    OSError if it changed for the worse since."""
    if settings.api_key_file:
        try:
            return ApiKeys.from_file(settings.api_key_file)
        except ValueError as e:
            raise OSError(f"SAFETY_API_KEY_FILE: {e}") from None
    return ApiKeys(parse_keys(settings.api_key, warn="SAFETY_API_KEY")) if settings.api_key else None


async def create_server(
    settings: ServeSettings, classifier: ClassifierSource = None, job_client: JobClientFactory | None = None
) -> SafetyServer:
    """Build and bind the server (port 0 in `settings.address` picks a free port); `start()` serves.

    `classifier`: an already loaded Classifier (tests share one), a zero-argument loader, or None to load
    `settings.model` (the bundled default when unset) inside `start()`. `job_client`: a zero-argument
    factory of the job RPCs' `worker.jobs.JobClient`, called on the first job RPC (None: from the `SAFETY_*`
    environment)."""
    if richstatus.OFF_BECAUSE is not None:  # once per server, never per call
        log.warning("rich error details (grpc-status-details-bin) are off: %s", richstatus.OFF_BECAUSE)
    metrics = Metrics()
    servicer = SafetyServicer(settings, observer=metrics, job_client=job_client)
    requestid.install_record_factory()  # a call's log lines carry its request id
    access = AccessLog(settings.access_log, settings.access_log_rate)
    if access.silenced:
        log.warning(
            "the access log (SAFETY_ACCESS_LOG=%s) writes INFO lines, which the log level drops "
            "(SAFETY_LOG_LEVEL=%s): it writes nothing", settings.access_log, settings.log_level,
        )  # fmt: skip
    counting = MetricsInterceptor(metrics, access)
    cap = CallCapInterceptor(counting, settings.max_concurrent_rpcs, settings.max_health_watches)
    interceptors: list[grpc.aio.ServerInterceptor] = [cap, counting, ErrorInterceptor()]
    keys = api_keys(settings)
    if keys is not None:
        interceptors.append(ApiKeyInterceptor(keys))
    # innermost: the others keep its request deserializer
    interceptors.append(DecodeInterceptor(max_bytes=settings.max_message_bytes))
    # no `maximum_concurrent_rpcs`: gRPC's would count health checks and watches too (CallCapInterceptor)
    server = grpc.aio.server(interceptors=interceptors, options=_server_options(settings))
    pb2_grpc.add_SafetyClassifierServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    tls = None
    if settings.tls_cert and settings.tls_key:  # checked now: grpc would say only "Failed to bind"
        tls = ReloadingCredentials(TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca))
    credentials = tls.credentials() if tls is not None else None
    try:
        if credentials is not None:
            port = server.add_secure_port(settings.address, credentials)
        else:
            port = server.add_insecure_port(settings.address)
    except RuntimeError as e:  # grpc: "Failed to bind to address ..."
        raise OSError(f"SAFETY_ADDRESS {settings.address}: cannot bind ({e})") from None
    if not port:
        raise OSError(f"SAFETY_ADDRESS {settings.address}: cannot bind")
    metrics_port = None
    if settings.metrics_address:  # bound here too, so that a taken port fails before the model loads
        try:
            metrics_port = metrics.serve(settings.metrics_address)
        except (OSError, OverflowError) as e:  # port taken, unknown host
            reason = getattr(e, "strerror", None) or e
            address = settings.metrics_address
            raise OSError(f"SAFETY_METRICS_ADDRESS {address}: cannot bind ({reason})") from None
    return SafetyServer(
        settings, server, port, servicer, health_servicer, metrics, classifier, metrics_port,
        tls=tls, cap=cap, access=access,
    )  # fmt: skip


def _reload_hint(app: SafetyServer) -> None:
    """SIGHUP: nothing to reload by hand. The TLS files are re-read when they change (re-checked now);
    the other settings need a restart."""
    log.info(
        "SIGHUP: TLS certificate, key and client CA are re-read when their files change; "
        "other settings need a restart"
    )
    if app.tls is not None:
        app.tls.refresh(force=True)


async def serve(settings: ServeSettings, classifier: ClassifierSource = None) -> int:
    """The `safety serve` process: serve until SIGTERM/SIGINT, drain within the grace period, return 0; or,
    if the device fails for good (a sticky CUDA error), drain (and, within the grace, wait for a scrape of
    /metrics to read `safety_device_failed`) and return 1 so the orchestrator replaces it.
    A drain that had to cut calls (the grace expired, or a second SIGTERM/SIGINT stopped it at once) also
    returns 1. SIGHUP logs and re-checks the TLS files (`_reload_hint`)."""
    logs.configure(settings.log_level, settings.log_format)
    try:
        app = await create_server(settings, classifier)
    except OSError as e:  # port taken, unreadable TLS files
        log.error("startup failed: %s", e)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_hint, app)  # not the default: die without draining
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        exc = starting.exception()
        log.error("startup failed: %s", exc, exc_info=None if isinstance(exc, SafetyError) else exc)
        stopping.cancel()
        await app.drain(0)
        return 1
    if not starting.done():
        starting.cancel()
        log.info("signal received while loading; exiting")
    else:
        failed = asyncio.create_task(app.device_failed.wait())
        await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
        if failed.done():  # a sticky CUDA error: every later batch would fail too
            log.critical("the device failed: NOT_SERVING, draining, exiting 1 to have this replica replaced")
            stopping.cancel()
        else:
            failed.cancel()
            log.info("signal received")
    # A drain after the device failed has had no signal yet. One that a signal started (even if the device
    # failed in the same moment, or fails during it) waits for nothing beyond its calls: no final scrape.
    signalled = stop.is_set()
    if signalled:
        app.interrupt()

    def on_signal() -> None:  # the second signal of a drain stops it at once
        nonlocal signalled
        if signalled:
            app.force()
        else:
            signalled = True
            log.info("signal received while draining")
            app.interrupt()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await app.drain()
    if app.cut:
        log.warning("stopped with %d calls cut; exiting 1", app.cut)
    return 1 if app.device_failed.is_set() or app.cut else 0


__all__ = [
    "ApiKeyInterceptor",
    "CallCapInterceptor",
    "SafetyServer",
    "create_server",
    "pb2",
    "serve",
    "warm_up",
]
