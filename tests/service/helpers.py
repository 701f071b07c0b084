"""Helpers for the service tests: a background event loop, polling with a timeout, request builders, a
server's metrics (`counted`, `scrape`, `metric_value`), API keys (`answer_code`, `write_keys`, `remove_k1`)
and a refused call (`refusal`)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from service.stubs import pb2, pb2_grpc
from tests.prometheus import metrics_text

if TYPE_CHECKING:
    from service.server import SafetyServer


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` blocks the caller until the coroutine is done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` every few milliseconds until it holds; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(*texts: str, **kwargs: Any) -> Any:
    return pb2.ClassifyRequest(items=[pb2.Item(text=t) for t in texts], **kwargs)


def held_requests(n: int, release: threading.Event) -> Iterator[Any]:
    """n one-item requests, then the stream stays open until `release` (so the server sees it unfinished)."""
    for i in range(n):
        yield request(f"request {i}")
    release.wait(30)


def queued(scheduler: Any) -> int:
    """Items tokenized and waiting in the scheduler's queue (not those still being tokenized)."""
    stats = scheduler.stats()
    return stats["queued_items"] - stats["tokenizing_items"]


def in_queue(app: Any) -> int:
    return queued(app.scheduler)


class ExplodingLaunch:
    """A classifier whose device launch raises an unexpected error ("kernel exploded"); the rest: `clf`."""

    def __init__(self, clf: Any) -> None:
        self._clf = clf

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clf, name)

    def launch(self, sequences: list[list[int]]) -> Any:
        raise RuntimeError("kernel exploded")


def counted(app: SafetyServer, method: str) -> Counter[str]:
    """safety_requests_total of `method`, by code (codes at 0 left out)."""
    codes: Counter[str] = Counter()
    for metric in app.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "safety_requests_total" and sample.labels["method"] == method and sample.value:
                codes[sample.labels["code"]] += int(sample.value)
    return codes


def scrape(app: SafetyServer) -> str:
    """The server's /metrics page."""
    return metrics_text(app.metrics_port)


def metric_value(text: str, name: str) -> float:
    """The value of the series `name` (with its labels, as the page writes them) on a /metrics page."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in metrics")


def answer_code(port: int, key: str) -> grpc.StatusCode:
    """The status an Info call with the API key `key` ends with on the server at `port`."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb2_grpc.SafetyClassifierStub(channel)
        try:
            stub.Info(pb2.InfoRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=5)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK


def write_keys(path: Path, *keys: str) -> None:
    """Replace the key file with one holding `keys`, as a Kubernetes Secret volume does (a new file)."""
    new = path.with_name(path.name + ".new")
    new.write_text("".join(f"{key}\n" for key in keys))
    new.replace(path)


def remove_k1(app: SafetyServer, path: Path) -> None:
    """Rotate k1 out of the key file (k2 in) and wait until a new call with k1 is refused."""
    write_keys(path, "k2")
    refused = grpc.StatusCode.UNAUTHENTICATED
    wait_until(lambda: answer_code(app.port, "k1") == refused, what="a new call with k1 refused")
    assert answer_code(app.port, "k2") == grpc.StatusCode.OK


def refusal(app: SafetyServer, stub: Any) -> grpc.RpcError:
    """Fill the held queue to its item bound, then one more call: its RESOURCE_EXHAUSTED error."""
    bound = app.scheduler.max_queue_items
    app.scheduler.hold_runner()
    try:
        admitted = [stub.Classify.future(request(f"queued {i}"), timeout=30) for i in range(bound)]
        wait_until(lambda: in_queue(app) == bound, what="queue full")
        try:
            stub.Classify(request("one too many"), timeout=10)
            raise AssertionError("admitted past the bound")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused = e
    finally:
        app.scheduler.release_runner()
    for call in admitted:
        assert call.result(30).results
    return refused
