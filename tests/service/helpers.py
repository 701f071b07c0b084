"""Helpers for the service tests: a background event loop, polling with a timeout, request builders."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from service.stubs import pb2


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
