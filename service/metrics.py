"""Prometheus metrics of the gRPC server, served by prometheus-client on their own HTTP port.

Owns: the metric names and buckets, a per-server `CollectorRegistry` (so several servers in one process, as in
tests, don't collide) with prometheus-client's process, platform and GC collectors on it (a fresh registry has
none of the default registry's), `safety_build_info`, the HTTP exporter, and `MetricsInterceptor`, which
counts every unary and streaming call that reaches the server's Python code by method and final status code,
gives it its request id (service/requestid.py: in `requestid.current` for the call's log lines, and in its
trailers) and hands every call's end to the access log (service/accesslog.py). The scheduler reports through
the `SchedulerMetrics` methods below and never imports prometheus itself. The labelled series the alerts and
the dashboard select (k8s/components) exist from start-up, at 0: every dropped-window reason, and every status
code and the latency of the classification calls. A series that appears only with its first event starts at
that count, and Prometheus' increase() and rate() take its first sample as the baseline: the event would go
unseen. Must not know: the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from model import package_version
from service import requestid
from service.accesslog import AccessLog
from service.errors import call_deadline, final_code
from service.handlers import WrappingInterceptor, reading_its_request, with_behavior
from service.scheduler import DROP_REASONS
from service.settings import split_address

# How often the /metrics server's loop looks for a shutdown: `close()` waits for it. At the stdlib's 0.5 s
# (prometheus-client's `start_http_server`), every drain blocked the event loop for up to half a second.
EXPORTER_POLL_S = 0.05
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
STREAM_REQUEST = "ClassifyStream.request"  # the `method` label of one request inside a ClassifyStream
# The classification calls (the `method` values the alerts and the dashboard select), and every status code
# they can end with: their safety_requests_total and safety_request_duration_seconds series exist from start.
CLASSIFY_METHODS = ("Classify", STREAM_REQUEST)
STATUS_CODES = tuple(code.name for code in grpc.StatusCode)


class ScrapedRegistry(CollectorRegistry):
    """A registry that knows which scrapes it has answered: each collection is numbered as it begins, and
    `scraped_since(mark)` says whether one that began at or after `mark()` has read every metric. A scrape
    begun after an event therefore saw its counts. `on_scrape`, when set, is called (in the exporter's
    thread) after each collection."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._begun = 0  # collections begun
        self._latest = -1  # the number of the latest collection begun that has read everything (-1: none)
        self.on_scrape: Callable[[], None] | None = None

    def collect(self) -> Iterator[Any]:
        with self._cond:
            number, self._begun = self._begun, self._begun + 1
        yield from super().collect()
        with self._cond:
            self._latest = max(self._latest, number)
        listener = self.on_scrape
        if listener is not None:
            listener()

    def mark(self) -> int:
        with self._cond:
            return self._begun

    def scraped_since(self, mark: int) -> bool:
        with self._cond:
            return self._latest >= mark


class Metrics:
    def __init__(self) -> None:
        self.registry = ScrapedRegistry()
        r = self.registry
        # process_* (CPU, memory, open fds, start time), python_info, python_gc_*
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build = Gauge(
            "safety_build_info",
            "1, labelled with the package version and the model, device and dtype being served",
            ["version", "model", "device", "dtype"],
            registry=r,
        )
        self._counted: dict[tuple[str, str], Any] = {}  # (method, code) -> safety_requests child
        self._timed: dict[str, Any] = {}  # method -> safety_request_duration_seconds child
        self.requests = Counter(
            "safety_requests", "gRPC calls by method and final status code", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "safety_request_duration_seconds",
            "gRPC call wall time",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter("safety_items", "items classified", registry=r)
        self.tokens = Counter(
            "safety_tokens", "content tokens classified (no context or special tokens)", registry=r
        )
        self.flagged = Counter("safety_flagged_items", "items flagged by any label", registry=r)
        self.batch_size = Histogram(
            "safety_batch_size", "sequences (windows) per batch", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "safety_batch_tokens", "tokens per batch", buckets=TOKEN_BUCKETS, registry=r
        )
        # What admission compares with its bounds, and the bounds (the alert on the queue takes the ratio).
        self.queue_items = Gauge(
            "safety_queue_items", "items queued (tokenizing or waiting for a batch)", registry=r
        )
        self.queue_tokens = Gauge(
            "safety_queue_tokens",
            "tokens queued: waiting for a batch, or of calls being tokenized (the part not tokenized yet "
            "estimated from its characters)",
            registry=r,
        )
        self.queue_max_items = Gauge(
            "safety_queue_max_items",
            "admission bound on safety_queue_items (SAFETY_MAX_QUEUE_ITEMS)",
            registry=r,
        )
        self.queue_max_tokens = Gauge(
            "safety_queue_max_tokens",
            "admission bound on safety_queue_tokens (SAFETY_MAX_QUEUE_TOKENS, or its default)",
            registry=r,
        )
        self.queue_seconds = Histogram(
            "safety_queue_wait_seconds",
            "time a window waits from enqueue to its batch starting",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "safety_tokenize_seconds", "tokenization time per request", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "safety_inference_seconds",
            "device time per batch (CUDA events around the forward on a GPU; its wall time on the CPU)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.device_seconds = Counter(
            "safety_device_seconds",
            "device time spent on batches; its rate is the share of time the device is busy",
            registry=r,
        )
        self.graph_replays = Counter(
            "safety_graph_replays",
            "batches that replayed a CUDA graph instead of launching kernel by kernel (over "
            "safety_batch_size_count: the share; SAFETY_GRAPH_TOKENS sets how large a batch can be graphed)",
            registry=r,
        )
        self.dropped = Counter(
            "safety_dropped_windows", "windows dropped before compute", ["reason"], registry=r
        )
        self.warmup_seconds = Gauge(
            "safety_warmup_seconds", "model load-time warm-up (torch.compile included when on)", registry=r
        )
        self.compiled = Gauge("safety_compiled", "1 when the network runs torch.compile'd", registry=r)
        self.device_failed = Gauge(
            "safety_device_failed",
            "1 once the device failed for good (a sticky CUDA error): the replica drains, waits within its "
            "drain grace for a scrape of this, and exits 1",
            registry=r,
        )
        self._http: Any = None
        # Every series the alerts and the dashboard select exists from the start, at 0 (see the docstring).
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for method in CLASSIFY_METHODS:
            self._timed[method] = self.request_seconds.labels(method=method)
            for code in STATUS_CODES:
                self._counted[method, code] = self.requests.labels(method=method, code=code)

    def serving(self, model: str, device: str, dtype: str) -> None:
        """The model is loaded: `safety_build_info` = 1 with its labels (one series per server)."""
        self.build.clear()
        self.build.labels(version=package_version(), model=model, device=device, dtype=dtype).set(1)

    # ---- SchedulerMetrics -------------------------------------------------------------------------------
    def queue_bounds(self, items: int, tokens: int) -> None:
        self.queue_max_items.set(items)
        self.queue_max_tokens.set(tokens)

    def queue_depth(self, items: int, tokens: int) -> None:
        self.queue_items.set(items)
        self.queue_tokens.set(tokens)

    def tokenized(self, seconds: float) -> None:
        self.tokenize_seconds.observe(seconds)

    def batch(self, sequences: int, tokens: int, seconds: float, waits: list[float], graphed: bool) -> None:
        self.batch_size.observe(sequences)
        if graphed:
            self.graph_replays.inc()
        self.batch_tokens.observe(tokens)
        self.inference_seconds.observe(seconds)
        self.device_seconds.inc(seconds)
        for w in waits:
            self.queue_seconds.observe(w)

    def drop(self, reason: str, windows: int) -> None:
        self.dropped.labels(reason=reason).inc(windows)

    def classified(self, items: int, tokens: int, flagged: int) -> None:
        self.items.inc(items)
        self.tokens.inc(tokens)
        self.flagged.inc(flagged)

    def stream_request(self, code: str, seconds: float) -> None:
        """A request of a ClassifyStream, counted like a call (method "ClassifyStream.request"); the stream
        itself is counted once, as "ClassifyStream", when it ends."""
        self.call(STREAM_REQUEST, code, seconds)

    def call(self, method: str, code: str, seconds: float | None) -> None:
        """A finished call (or stream request): counted by method and status code, timed by method (None:
        counted only, a call that ended before its request arrived). The labelled children are looked up once
        (prometheus-client's `labels()` costs ~5 us a call)."""
        counter = self._counted.get((method, code))
        if counter is None:
            counter = self._counted[method, code] = self.requests.labels(method=method, code=code)
        timer = self._timed.get(method)
        if timer is None:
            timer = self._timed[method] = self.request_seconds.labels(method=method)
        counter.inc()
        if seconds is not None:
            timer.observe(seconds)

    # ---- HTTP exporter ----------------------------------------------------------------------------------
    def serve(self, address: str) -> int:
        """Start the /metrics HTTP server on `address` (port 0: any free port); returns the bound port.
        prometheus-client's `start_http_server` (its WSGI app and threading server, the address family
        chosen from the address: IPv6 too), polled for a shutdown every EXPORTER_POLL_S."""
        host, port = split_address(address)
        host = host.strip("[]") or "0.0.0.0"
        family, *_, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        self._http = make_server(sockaddr[0], int(port), make_wsgi_app(self.registry), server, QuietHandler)
        threading.Thread(
            target=self._http.serve_forever, args=(EXPORTER_POLL_S,), name="safety-metrics", daemon=True
        ).start()
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class QuietHandler(WSGIRequestHandler):
    """No log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsInterceptor(WrappingInterceptor):
    """Outermost interceptor: counts each unary-unary, unary-stream and stream-stream call (Classify,
    SubmitJob, StreamJobResults, ClassifyStream, ...) by method and the status code it ended with, and
    observes its wall time; a stream is counted once, when it ends. Every call that reaches it is counted:
    a handler of one request becomes one of a request stream (`reading_its_request`) that reads the request
    itself, so a call cancelled, or out of time, before its request arrived (which grpc.aio would end without
    running any handler) counts as CANCELLED or DEADLINE_EXCEEDED like one that ends later. A call the API
    key refuses comes here as a request stream that nobody reads (service/server.py): it is counted (and
    timed from its start) without its request being read or parsed. Calls that gRPC core ends before it
    hands them to Python never reach any interceptor (docs/api.md, "Metrics")."""

    def __init__(self, metrics: Metrics, access: AccessLog | None = None) -> None:
        super().__init__()
        self.metrics = metrics
        self.access = AccessLog("off") if access is None else access

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._observed(method, context) as clock:
                    request = await _the_request(context)
                    clock.start()
                    return await behavior(request, context)

            return reading_its_request(handler, unary)
        if handler.unary_stream is not None or handler.stream_stream is not None:
            # grpc.aio picks the calling convention from the handler's kind: keep it.
            stream = handler.unary_stream or handler.stream_stream
            one_request = handler.unary_stream is not None
            wrapped: Callable[..., Any]
            if inspect.isasyncgenfunction(stream):

                async def generator(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    with self._observed(method, context) as clock:
                        request = await _the_request(context) if one_request else requests
                        clock.start()
                        async for message in stream(request, context):
                            yield message

                wrapped = generator
            elif inspect.iscoroutinefunction(stream):  # writes with context.write(), e.g. Health.Watch

                async def writer(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                    with self._observed(method, context) as clock:
                        request = await _the_request(context) if one_request else requests
                        clock.start()
                        return await stream(request, context)

                wrapped = writer
            else:  # a synchronous generator (grpc runs it in a thread): not ours, left alone
                return handler
            return reading_its_request(handler, wrapped) if one_request else with_behavior(handler, wrapped)
        if handler.stream_unary is not None:  # a call refused before its request is read (the API key)
            refusal = handler.stream_unary

            async def unread(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._observed(method, context) as clock:
                    clock.start()
                    return await refusal(requests, context)

            return with_behavior(handler, unread)
        return handler

    @contextlib.contextmanager
    def _observed(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[_Clock]:
        """Count the call when it ends; time it from `clock.start()` (a call of one request: once that
        request has arrived, so a slow upload is the client's time, as it was when grpc read it for us; a
        call that ended before it arrived is counted, not timed; a refused one, never read: from its
        start)."""
        clock = _Clock()
        deadline = call_deadline(context)
        code = "OK"
        # the call's task is its own (grpc.aio): the id stays with this call, and needs no reset
        requestid.current.set(requestid.request_id(context.invocation_metadata()))
        context.set_trailing_metadata(requestid.trailer())  # an error's trailers keep it too (abort_for)
        try:
            yield clock
        except BaseException:
            code = final_code(context, deadline)
            raise
        finally:
            seconds = clock.seconds()
            self.metrics.call(method, code, seconds)
            # a failed call's line comes after its client has the status (grpc.aio sends an abort's first)
            self.access.call(method, code, seconds, context.peer)  # peer() only for a line written


class _Clock:
    """When a call's own time began (None: not yet)."""

    __slots__ = ("began",)

    def __init__(self) -> None:
        self.began: float | None = None

    def start(self) -> None:
        self.began = time.perf_counter()

    def seconds(self) -> float | None:
        return None if self.began is None else time.perf_counter() - self.began


async def _the_request(context: grpc.aio.ServicerContext) -> Any:
    """The one request of a call, read by the handler (`reading_its_request`). None came: the call was
    cancelled or ran out of time first (or the client sent no message); like grpc.aio's own handling of such
    a call, it ends without a status of ours (CancelledError)."""
    request = await context.read()
    if request is grpc.aio.EOF:
        raise asyncio.CancelledError("the call ended before its request arrived")
    return request
