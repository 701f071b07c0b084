"""The server's bounds on what clients hold open: calls open at once (SAFETY_MAX_CONCURRENT_RPCS, beyond it
gRPC refuses new calls with RESOURCE_EXHAUSTED), connections without a call (SAFETY_MAX_CONNECTION_IDLE_S,
closed with GOAWAY), and connections past their age (SAFETY_MAX_CONNECTION_AGE_S: no new calls on them,
but the calls open on them, streams included, go on). Real servers on port 0."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from service.settings import ServeSettings
from service.stubs import SERVICE_NAME, pb2, pb2_grpc
from tests.service.helpers import request, wait_until
from tests.service.test_revoked_keys import Sender


def held_classify(channel: grpc.Channel, release: threading.Event) -> Any:
    """A Classify call that sends its headers, then nothing until `release`: open on the server meanwhile."""

    def nothing() -> Iterator[Any]:
        release.wait(30)
        yield from ()

    return channel.stream_unary(f"/{SERVICE_NAME}/Classify").future(nothing(), timeout=30)


def test_calls_beyond_the_concurrent_rpc_cap_are_refused(start_server: Any) -> None:
    app = start_server(max_concurrent_rpcs=3, metrics_address=None)
    release = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb2_grpc.SafetyClassifierStub(channel)
        assert stub.Info(pb2.InfoRequest(), timeout=10).limits.max_concurrent_rpcs == 3
        held = [held_classify(channel, release) for _ in range(3)]
        try:

            def refused() -> bool:
                try:
                    stub.Info(pb2.InfoRequest(), timeout=10)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                    assert "Concurrent RPC limit exceeded" in e.details()
                    return True
                return False

            wait_until(refused, what="a call beyond the three held ones refused")
        finally:
            release.set()
            for call in held:
                call.cancel()
        wait_until(lambda: not refused(), what="calls accepted again once the held ones ended")


def test_the_defaults_cap_calls_and_connections_without_cutting_streams() -> None:
    s = ServeSettings()
    assert s.max_concurrent_rpcs == 8192 > 2 * s.max_queue_items - 1  # a full queue of one-item calls fits
    assert (s.max_connection_idle_s, s.max_connection_age_s) == (600, 1800)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("max_concurrent_rpcs", 0, "must be a positive integer, got 0"),
        ("max_connection_idle_s", -1, "must be 0 (never) to 2147483 seconds, got -1"),
        ("max_connection_age_s", 2_147_484, "must be 0 (never) to 2147483 seconds, got 2147484"),
    ],
)
def test_connection_settings_are_checked(name: str, value: int, says: str) -> None:
    with pytest.raises(ValueError, match=rf"{name.upper()}: {says}".replace("(", r"\(").replace(")", r"\)")):
        ServeSettings(**{name: value})


def states_of(channel: grpc.Channel) -> list[grpc.ChannelConnectivity]:
    """The connectivity states `channel` goes through from now on (appended as they come)."""
    seen: list[grpc.ChannelConnectivity] = []
    channel.subscribe(seen.append, try_to_connect=False)
    return seen


def test_a_connection_without_calls_is_closed_after_the_idle_time(start_server: Any) -> None:
    app = start_server(max_connection_idle_s=1, metrics_address=None)
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        pb2_grpc.SafetyClassifierStub(channel).Info(pb2.InfoRequest(), timeout=10)
        seen = states_of(channel)
        wait_until(lambda: grpc.ChannelConnectivity.IDLE in seen, what="the server closing it")
        # the next call reconnects
        pb2_grpc.SafetyClassifierStub(channel).Info(pb2.InfoRequest(), timeout=10)


def test_a_stream_outlives_its_connections_age(start_server: Any) -> None:
    """Past its age the connection takes no new calls (the channel goes IDLE and reconnects for the next
    one), but a ClassifyStream open on it is not cut: it answers a request sent after the GOAWAY."""
    app = start_server(max_connection_age_s=1, metrics_address=None)
    sender = Sender()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb2_grpc.SafetyClassifierStub(channel)
        answers = stub.ClassifyStream(iter(sender), timeout=60)
        try:
            sender.send(request("before"))
            assert next(answers).HasField("response")
            seen = states_of(channel)
            wait_until(lambda: grpc.ChannelConnectivity.IDLE in seen, what="the connection's GOAWAY")
            sender.send(request("after"))
            answer = next(answers)
            assert answer.HasField("response") and answer.sequence == 1
        finally:
            sender.close()
        assert list(answers) == []
