"""RESOURCE_EXHAUSTED carries gRPC's retry hint, the `grpc-retry-pushback-ms` trailer: the time the device
needs at its recent rate to free room for the refused call, clamped (service.scheduler.RETRY_*); a real
server on port 0."""

from __future__ import annotations

from typing import Any

from service.errors import RETRY_PUSHBACK
from service.scheduler import RETRY_DEFAULT_MS, RETRY_MAX_MS, RETRY_MIN_MS
from service.server import SafetyServer
from tests.service.helpers import refusal


def refusal_pushback(app: SafetyServer, stub: Any) -> int:
    """The pushback of a refused call (`refusal`), in milliseconds."""
    trailers = dict(refusal(app, stub).trailing_metadata() or ())
    assert RETRY_PUSHBACK in trailers, trailers
    return int(trailers[RETRY_PUSHBACK])


def test_resource_exhausted_carries_a_retry_pushback(start_server: Any, stub_for: Any) -> None:
    app = start_server(max_queue_items=4)
    stub = stub_for(app)
    assert refusal_pushback(app, stub) == RETRY_DEFAULT_MS  # no batch has measured the device yet
    # the first round's batches measured the device: a tiny model frees room for one item in microseconds
    assert app.scheduler._seconds_per_token is not None
    assert refusal_pushback(app, stub) == RETRY_MIN_MS
    with app.scheduler._cond:  # 50 ms a token: room for one more item is one queued item's few tokens
        app.scheduler._seconds_per_token = 0.05
    assert RETRY_MIN_MS < refusal_pushback(app, stub) < 2000
    with app.scheduler._cond:  # a second per token: over the cap
        app.scheduler._seconds_per_token = 1.0
    assert refusal_pushback(app, stub) == RETRY_MAX_MS
