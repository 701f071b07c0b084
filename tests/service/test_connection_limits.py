"""The server's bounds on what clients hold open: calls open at once (SAFETY_MAX_CONCURRENT_RPCS, beyond it
gRPC refuses new calls with RESOURCE_EXHAUSTED), connections without a call (SAFETY_MAX_CONNECTION_IDLE_S,
closed with GOAWAY), connections past their age (SAFETY_MAX_CONNECTION_AGE_S: no new calls on them, but the
calls open on them, streams included, go on), and a flood of HTTP/2 pings (cut off with GOAWAY
too_many_pings instead of answered for ever). Real servers on port 0; the ping flood is sent as raw HTTP/2
frames."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from service.server import SafetyServer, _server_options
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
    assert (s.max_connection_idle_s, s.max_connection_age_s) == (600, 300)


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


# ---- a ping flood, as raw HTTP/2 frames -----------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 4, 6, 7
ACK = 1
ENHANCE_YOUR_CALM = 0xB


def frame(kind: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", 0) + payload


def goaway_after_pings(port: int, pings: int, within_s: float) -> tuple[int, bytes] | None:
    """Open an HTTP/2 connection, send `pings` PINGs at once, and return the server's GOAWAY (error code,
    debug data) if one comes within `within_s` seconds (None: the pings were only answered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=within_s) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0))
        sock.sendall(b"".join(frame(PING, 0, struct.pack(">Q", i)) for i in range(pings)))
        buffer, end = b"", time.monotonic() + within_s
        while time.monotonic() < end:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            buffer += data
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags, payload = buffer[3], buffer[4], buffer[9 : 9 + length]
                buffer = buffer[9 + length :]
                if kind == SETTINGS and not flags & ACK:
                    sock.sendall(frame(SETTINGS, ACK))
                if kind == GOAWAY:
                    return int.from_bytes(payload[4:8], "big"), payload[8:]
            sock.settimeout(max(0.01, end - time.monotonic()))
    return None


def test_ping_strikes_are_limited() -> None:
    options = dict(_server_options(ServeSettings()))
    assert options.get("grpc.http2.max_ping_strikes", 2) == 2  # 0 would be no limit


def test_a_ping_flood_is_cut_off(server: SafetyServer) -> None:
    """Before, `grpc.http2.max_ping_strikes` was 0 (no limit): every ping of a flood was answered."""
    goaway = goaway_after_pings(server.port, pings=20, within_s=5)
    assert goaway is not None, "no GOAWAY: the server answered every ping"
    code, debug = goaway
    assert code == ENHANCE_YOUR_CALM and b"too_many_pings" in debug, goaway
