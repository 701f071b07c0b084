"""A call without an accepted API key is refused before any of its request is read: grpc neither waits for
the request message nor receives or parses it, so a huge message sent without a key costs the server
nothing, and a call that never sends its message is answered at once instead of being held open. The
refusal is still counted in safety_requests_total as UNAUTHENTICATED. Real servers on port 0."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from service.server import SafetyServer
from service.stubs import SERVICE_NAME, pb2
from tests.service.helpers import wait_until
from tests.service.test_call_counting import counted

LIMIT = 4096  # SAFETY_MAX_MESSAGE_BYTES of these servers: grpc's own receive limit is twice that
# (method, one request of it): a unary call, a server stream, a job RPC
METHODS = [
    ("Classify", pb2.ClassifyRequest(items=[pb2.Item(text="x" * (4 * LIMIT))])),
    ("StreamJobResults", pb2.StreamJobResultsRequest(job_id="j" * (4 * LIMIT))),
    ("SubmitJob", pb2.SubmitJobRequest(items=[pb2.Item(text="x" * (4 * LIMIT))])),
]
NO_KEY: list[tuple[str, str]] = []
WRONG_KEY = [("authorization", "Bearer wrong")]


@pytest.fixture(scope="module")
def keyed(start_server: Any) -> SafetyServer:
    return start_server(api_key="s3cret", max_message_bytes=LIMIT, metrics_address=None)


def streaming_call(channel: grpc.Channel, method: str) -> Any:
    """`method` called as a client that streams its request message (on the wire the same call)."""
    path = f"/{SERVICE_NAME}/{method}"
    if method == "StreamJobResults":
        return channel.stream_stream(path)
    return channel.stream_unary(path)


@pytest.mark.parametrize(("method", "message"), METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("metadata", [NO_KEY, WRONG_KEY], ids=["no key", "wrong key"])
def test_a_message_over_grpcs_own_limit_without_a_key_is_unauthenticated_not_read(
    keyed: SafetyServer, method: str, message: Any, metadata: list[tuple[str, str]]
) -> None:
    """Over twice SAFETY_MAX_MESSAGE_BYTES, gRPC itself refuses a message it reads (RESOURCE_EXHAUSTED,
    `Received message larger than max`): answered UNAUTHENTICATED instead, the message was never read."""
    data = message.SerializeToString()
    assert len(data) > 2 * LIMIT
    before = counted(keyed, method)["UNAUTHENTICATED"]
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{keyed.port}", options=options) as channel:
        path = f"/{SERVICE_NAME}/{method}"
        call = channel.unary_stream(path) if method == "StreamJobResults" else channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as err:
            answer = call(data, metadata=metadata, timeout=10)
            if method == "StreamJobResults":
                list(answer)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert "missing or wrong API key" in err.value.details()
    wait_until(lambda: counted(keyed, method)["UNAUTHENTICATED"] == before + 1, what="the refusal counted")


@pytest.mark.parametrize("method", ["Classify", "StreamJobResults", "SubmitJob", "ClassifyStream"])
def test_a_call_without_a_key_that_never_sends_its_message_is_refused_at_once(
    keyed: SafetyServer, method: str
) -> None:
    """Before, the server waited for the request message (for ever, without a deadline) before it looked at
    the key: every such call stayed open, holding the server's memory and a slot of its connection."""
    before = counted(keyed, method)["UNAUTHENTICATED"]
    release = threading.Event()

    def nothing() -> Any:
        release.wait(30)
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{keyed.port}") as channel:
        t0 = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as err:
                answer = streaming_call(channel, method)(nothing(), timeout=20)
                if method in ("StreamJobResults", "ClassifyStream"):
                    list(answer)
            took = time.monotonic() - t0
        finally:
            release.set()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert took < 5, took  # not the 20 s deadline
    wait_until(lambda: counted(keyed, method)["UNAUTHENTICATED"] == before + 1, what="the refusal counted")


def test_a_call_with_the_key_still_reads_its_request(keyed: SafetyServer) -> None:
    """The refusal is for calls without the key: with it, the message is read and judged (here: too large,
    INVALID_ARGUMENT naming the limit)."""
    data = pb2.ClassifyRequest(items=[pb2.Item(text="x" * (LIMIT + 100))]).SerializeToString()
    assert LIMIT < len(data) < 2 * LIMIT
    with grpc.insecure_channel(f"127.0.0.1:{keyed.port}") as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(f"/{SERVICE_NAME}/Classify")(
            data, metadata=[("authorization", "Bearer s3cret")], timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SAFETY_MAX_MESSAGE_BYTES" in err.value.details()
