"""Signals of the `safety serve` process (`service.server.serve` in this process's main thread, where
asyncio installs signal handlers, with real signals sent to it): SIGHUP only logs; a drain whose grace
expires, or that a second signal cuts short, says how many calls it cut and exits 1."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.server import serve
from service.settings import ServeSettings
from service.stubs import pb2_grpc
from tests.service.helpers import request, wait_until
from tests.worker.harness import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING


class Records(logging.Handler):
    """The records of `safety.service` (serve() replaces the root logger's handlers, caplog's too)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def find(self, text: str) -> logging.LogRecord | None:
        return next((r for r in self.records if text in r.getMessage()), None)


@pytest.fixture
def records() -> Iterator[Records]:
    logger, handler = logging.getLogger("safety.service"), Records()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    root.handlers[:], root.level = saved


def health_status(port: int, ca: Path | None = None) -> Any:
    """The server's grpc.health.v1 status (over TLS trusting `ca` when given); None if it does not answer."""
    if ca is None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    else:
        channel = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca.read_bytes()))
    with channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check
            return check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None


def serving(port: int) -> bool:
    return health_status(port) == SERVING


def run_serve(
    classifier: Any,
    grace: float,
    client: Callable[[int], None],
    ready: Callable[[int], bool] = serving,
    **settings: Any,
) -> int:
    """serve() on a free port in this (the main) thread, `client(port)` in another once `ready(port)`
    (default: SERVING over plaintext); serve's exit code. `settings`: more ServeSettings fields (TLS)."""
    port = free_port()
    values = {"metrics_address": None, "drain_grace_s": grace, "log_format": "text", **settings}
    failure: list[BaseException] = []

    def drive() -> None:
        try:
            wait_until(lambda: ready(port), timeout=30, what="SERVING")
            client(port)
        except BaseException as e:
            failure.append(e)
            os.kill(os.getpid(), signal.SIGTERM)  # don't leave serve() running

    thread = threading.Thread(target=drive)
    thread.start()
    with asyncio.Runner() as runner:
        try:
            code = runner.run(serve(ServeSettings(address=f"127.0.0.1:{port}", **values), classifier))
        finally:
            # Before the loop closes: until then serve()'s signal handlers stay installed, so a signal the
            # client sends after serve() returned (a test failing) is ignored instead of killing pytest.
            thread.join(30)
    if failure:
        raise failure[0]
    return code


Held = tuple[threading.Event, threading.Event]


@pytest.fixture
def slow_batches(tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch) -> Held:
    """(entered, release): a batch sets `entered` on the device, then waits for `release` (the test sets it
    once the call is cut)."""
    entered, release, launch = threading.Event(), threading.Event(), tiny_classifier.launch

    def slow(sequences: Any) -> Any:
        entered.set()
        release.wait(30)
        return launch(sequences)

    monkeypatch.setattr(tiny_classifier, "launch", slow)
    return entered, release


def test_sighup_does_not_stop_the_server(tiny_classifier: Any, records: Records) -> None:
    def client(port: int) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: records.find("SIGHUP") is not None, what="the SIGHUP log line")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert pb2_grpc.SafetyClassifierStub(channel).Classify(request("still here"), timeout=10).results
        os.kill(os.getpid(), signal.SIGTERM)

    assert run_serve(tiny_classifier, 5.0, client) == 0
    assert "re-read when their files change" in records.find("SIGHUP").getMessage()
    assert records.find("draining") is not None and records.find("cutting") is None


def cut_call(port: int, held: Held, signals: int) -> tuple[grpc.StatusCode, float]:
    """A Classify held by `slow_batches`, then SIGTERM (and, `signals`=2, SIGINT at once after it): the
    call's status code, and seconds from the first signal to the client seeing it."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb2_grpc.SafetyClassifierStub(channel).Classify.future(request("held"), timeout=60)
        entered, release = held
        assert entered.wait(10), "the call never reached the device"
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        if signals == 2:
            wait_until(lambda: not serving(port), what="NOT_SERVING")
            os.kill(os.getpid(), signal.SIGINT)
        try:
            call.result(30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        seconds = time.monotonic() - t0
    release.set()
    return code, seconds


def test_expired_grace_warns_with_the_calls_cut_and_exits_1(
    tiny_classifier: Any, slow_batches: Held, records: Records
) -> None:
    seen: dict[str, Any] = {}

    def client(port: int) -> None:
        seen["code"], seen["seconds"] = cut_call(port, slow_batches, signals=1)

    assert run_serve(tiny_classifier, 1.0, client) == 1
    assert seen["code"] == grpc.StatusCode.UNAVAILABLE and seen["seconds"] >= 1.0
    warning = records.find("drain grace expired")
    assert warning is not None and warning.levelno == logging.WARNING
    assert warning.in_flight == 1 and "cutting 1 calls" in warning.getMessage()


def test_a_second_signal_stops_the_drain_at_once(
    tiny_classifier: Any, slow_batches: Held, records: Records
) -> None:
    seen: dict[str, Any] = {}

    def client(port: int) -> None:
        seen["code"], seen["seconds"] = cut_call(port, slow_batches, signals=2)

    assert run_serve(tiny_classifier, 30.0, client) == 1
    assert seen["code"] == grpc.StatusCode.UNAVAILABLE and seen["seconds"] < 15  # not the 30 s grace
    assert records.find("second signal: stopping at once") is not None
    assert records.find("stopping at once (second signal): cutting 1 calls") is not None
