"""Fixtures for the gRPC service tests: real servers on port 0 running in a background event loop, fed by the
session's tiny random checkpoint, and blocking clients in the test thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from service.server import SafetyServer, create_server
from service.settings import ServeSettings
from service.stubs import pb2_grpc
from tests.service.helpers import LoopThread


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def start_server(loop_thread: LoopThread, tiny_classifier: Any) -> Iterator[Callable[..., SafetyServer]]:
    """Factory: `start_server(**settings)` -> a started SafetyServer on 127.0.0.1:0 sharing the tiny model.
    Every server is drained at the end of the session (tests may drain theirs earlier)."""
    started: list[SafetyServer] = []

    def start(classifier: Any = tiny_classifier, **overrides: Any) -> SafetyServer:
        values = {"address": "127.0.0.1:0", "metrics_address": "127.0.0.1:0", "max_wait_ms": 2.0, **overrides}
        app = loop_thread.run(create_server(ServeSettings(**values), classifier))
        started.append(app)
        loop_thread.run(app.start())
        return app

    yield start
    for app in started:
        loop_thread.run(app.drain(0))


@pytest.fixture(scope="module")
def server(start_server: Callable[..., SafetyServer]) -> SafetyServer:
    """One default server per test module."""
    return start_server()


@pytest.fixture
def stub_for() -> Iterator[Callable[..., Any]]:
    channels: list[grpc.Channel] = []

    def make(app: SafetyServer) -> Any:
        channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        return pb2_grpc.SafetyClassifierStub(channel)

    yield make
    for ch in channels:
        ch.close()


@pytest.fixture
def stub(server: SafetyServer, stub_for: Callable[..., Any]) -> Any:
    return stub_for(server)
