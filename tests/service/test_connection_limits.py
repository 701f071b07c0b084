"""The server's bounds on what clients hold open: calls open at once (SAFETY_MAX_CONCURRENT_RPCS, beyond it
new calls are refused with RESOURCE_EXHAUSTED and a retry hint; health checks never capped, health watches
capped apart by SAFETY_MAX_HEALTH_WATCHES), connections without a call (SAFETY_MAX_CONNECTION_IDLE_S,
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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import error_details
from service.richstatus import RETRY_PUSHBACK
from service.server import CAP_RETRY_MS, SafetyServer, _server_options
from service.settings import ServeSettings
from service.stubs import SERVICE_NAME, pb2, pb2_grpc
from tests.service.helpers import counted, request, wait_until
from tests.service.test_revoked_keys import Sender

KEY = "cap-test-key-0123456789"
KEYED = [("authorization", f"Bearer {KEY}")]


def held_classify(
    channel: grpc.Channel, release: threading.Event, metadata: Any = None, timeout: float = 30
) -> Any:
    """A Classify call that sends its headers, then nothing until `release`: open on the server meanwhile."""

    def nothing() -> Iterator[Any]:
        release.wait(30)
        yield from ()

    call = channel.stream_unary(f"/{SERVICE_NAME}/Classify")
    return call.future(nothing(), metadata=metadata, timeout=timeout)


def over_the_cap(stub: Any, metadata: Any = None) -> grpc.RpcError | None:
    """An Info call's RESOURCE_EXHAUSTED error (None: it was answered)."""
    try:
        stub.Info(pb2.InfoRequest(), metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
        return e
    return None


def retry_hint(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(RETRY_PUSHBACK)


def test_calls_beyond_the_concurrent_rpc_cap_are_refused(start_server: Any) -> None:
    """Beyond SAFETY_MAX_CONCURRENT_RPCS a call is refused at once with RESOURCE_EXHAUSTED and a retry hint,
    counted in safety_requests_total (before: gRPC's own 'Concurrent RPC limit exceeded!', no hint, not
    counted); once the held calls end, calls are answered again."""
    app = start_server(max_concurrent_rpcs=3, metrics_address=None)
    release = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb2_grpc.SafetyClassifierStub(channel)
        assert stub.Info(pb2.InfoRequest(), timeout=10).limits.max_concurrent_rpcs == 3
        held = [held_classify(channel, release) for _ in range(3)]
        try:
            wait_until(
                lambda: over_the_cap(stub) is not None, what="a call beyond the three held ones refused"
            )
            error = over_the_cap(stub)
            assert error is not None and "SAFETY_MAX_CONCURRENT_RPCS" in error.details()
            assert retry_hint(error) == str(CAP_RETRY_MS)
            # not QUEUE_FULL: a client tells a leak of open calls from load by the reason
            assert error_details(error).reason == "TOO_MANY_CALLS"
            refused = lambda: counted(app, "Info")["RESOURCE_EXHAUSTED"] >= 2  # noqa: E731
            wait_until(refused, what="the refusals counted")
        finally:
            release.set()
            for call in held:
                call.cancel()
        wait_until(lambda: over_the_cap(stub) is None, what="calls accepted again once the held ones ended")


def test_health_watches_take_no_slot_from_keyed_calls_or_health_checks(start_server: Any) -> None:
    """More Health/Watch streams (no key needed, never ending) than both caps: Health/Check still answers
    SERVING and a keyed call is still answered (before: both RESOURCE_EXHAUSTED 'Concurrent RPC limit
    exceeded!', and a liveness probe failing so would get the pod restarted). Watches beyond their own cap
    are refused."""
    app = start_server(max_concurrent_rpcs=3, max_health_watches=2, api_key=KEY, metrics_address=None)
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb2_grpc.SafetyClassifierStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(6)]
        try:
            first: list[Any] = []  # the first answer of each: SERVING, or the refusal
            for watch in watches:
                try:
                    first.append(next(watch).status)
                except grpc.RpcError as e:
                    first.append(e)
            for _ in range(5):
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert stub.Classify(request("hello"), metadata=KEYED, timeout=10).results
            assert stub.Info(pb2.InfoRequest(), metadata=KEYED, timeout=10).model
            assert first.count(health_pb2.HealthCheckResponse.SERVING) == 2
            refused = [e for e in first if isinstance(e, grpc.RpcError)]
            assert len(refused) == 4
            for e in refused:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert "SAFETY_MAX_HEALTH_WATCHES" in e.details() and retry_hint(e) == str(CAP_RETRY_MS)
                assert error_details(e).reason == "TOO_MANY_CALLS"
        finally:
            for watch in watches:
                watch.cancel()
        assert app.cap is not None
        wait_until(lambda: app.cap.open == {"calls": 0, "watches": 0}, what="every count released")


def test_keyed_calls_beyond_the_cap_are_refused_with_a_retry_hint_and_the_count_is_released(
    start_server: Any,
) -> None:
    """Keyed ClassifyStreams held open fill the cap: the next keyed call is refused (a retry hint, counted).
    Every way a call ends gives its slot back: answered, aborted (no key; a bad request), cancelled, out of
    time, and the streams ending; afterwards the server takes the cap's worth of calls again."""
    app = start_server(max_concurrent_rpcs=3, api_key=KEY, metrics_address=None)
    release = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb2_grpc.SafetyClassifierStub(channel)
        senders = [Sender() for _ in range(3)]
        streams = [stub.ClassifyStream(iter(sender), metadata=KEYED, timeout=60) for sender in senders]
        try:
            for sender, stream in zip(senders, streams, strict=True):
                sender.send(request("held"))
                assert next(stream).HasField("response")
            before = counted(app, "Info")["RESOURCE_EXHAUSTED"]
            error = over_the_cap(stub, KEYED)
            assert error is not None, "a call beyond the three held streams was answered"
            assert retry_hint(error) == str(CAP_RETRY_MS)
            wait_until(
                lambda: counted(app, "Info")["RESOURCE_EXHAUSTED"] == before + 1, what="the refusal counted"
            )
        finally:
            for sender in senders:
                sender.close()
        for stream in streams:
            assert list(stream) == []
        wait_until(lambda: over_the_cap(stub, KEYED) is None, what="calls answered again")
        # ended every way, one at a time
        assert stub.Classify(request("ok"), metadata=KEYED, timeout=10).results
        for metadata, message in (([], request("x")), (KEYED, pb2.ClassifyRequest())):
            with pytest.raises(grpc.RpcError):
                stub.Classify(message, metadata=metadata, timeout=10)
        cancelled = held_classify(channel, release, KEYED)
        late = held_classify(channel, release, KEYED, timeout=0.5)
        wait_until(lambda: late.done(), what="the deadline")
        cancelled.cancel()
        assert app.cap is not None
        wait_until(lambda: app.cap.open["calls"] == 0, what="every count released")
        again = [held_classify(channel, release, KEYED) for _ in range(3)]
        wait_until(lambda: app.cap.open["calls"] == 3, what="the cap's worth of calls open again")
        release.set()
        for call in again:
            call.cancel()
        wait_until(lambda: app.cap.open["calls"] == 0, what="every count released")


def test_the_drain_releases_the_counts_of_the_calls_it_cuts(start_server: Any, loop_thread: Any) -> None:
    app = start_server(max_concurrent_rpcs=3, metrics_address=None)
    assert app.cap is not None
    release = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        held = held_classify(channel, release)
        wait_until(lambda: app.cap.open == {"calls": 1, "watches": 1}, what="both open")
        loop_thread.run(app.drain(0.5))
        assert app.cap.open == {"calls": 0, "watches": 0}
        release.set()
        held.cancel()
        watch.cancel()


def test_the_defaults_cap_calls_and_connections_without_cutting_streams() -> None:
    s = ServeSettings()
    assert s.max_concurrent_rpcs == 8192 > 2 * s.max_queue_items - 1  # a full queue of one-item calls fits
    assert s.max_health_watches == 64
    assert (s.max_connection_idle_s, s.max_connection_age_s) == (600, 300)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("max_concurrent_rpcs", 0, "must be a positive integer, got 0"),
        ("max_health_watches", 0, "must be a positive integer, got 0"),
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
