"""An API key removed from SAFETY_API_KEY_FILE stops working on calls already open, not only on new ones: a
ClassifyStream (or a reflection stream) that reads a request after its key was removed ends with
UNAUTHENTICATED, answering the requests it had read before; the stream is counted with that code. Real
servers on port 0; the key file is rewritten as a Secret volume does (a new file swapped in). The
server-streaming StreamJobResults is covered in test_jobs_rpc.py (it needs Redis)."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.client import error_details
from service.stubs import pb2_grpc
from tests.service.helpers import answer_code, counted, in_queue, remove_k1, request, wait_until, write_keys

REVOKED = "API key revoked"


class Sender:
    """A request stream the test writes to one message at a time (`send`); `close()` ends it."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def __iter__(self) -> Iterator[Any]:
        while (message := self._queue.get(timeout=60)) is not None:
            yield message

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    write_keys(path, "k1")
    return path


K1 = [("authorization", "Bearer k1")]


def test_a_removed_key_ends_an_open_classify_stream_at_its_next_request(
    start_server: Any, key_file: Path
) -> None:
    """The reviewer's reproduction: before, the three requests after the rotation were all answered."""
    app = start_server(api_key_file=str(key_file), metrics_address=None)
    sender = Sender()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stream = pb2_grpc.SafetyClassifierStub(channel).ClassifyStream(iter(sender), metadata=K1, timeout=60)
        try:
            sender.send(request("before the rotation"))
            first = next(stream)
            assert first.sequence == 0 and first.HasField("response")
            remove_k1(app, key_file)
            for i in range(3):
                sender.send(request(f"after the rotation {i}"))
            with pytest.raises(grpc.RpcError) as err:
                next(stream)  # no answer to a request read with a removed key: the stream ends
        finally:
            sender.close()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert REVOKED in err.value.details() and "1 responses were sent" in err.value.details()
    details = error_details(err.value)
    assert details is not None and details.reason == "UNAUTHENTICATED"
    # counted like any refusal; the refused request was never started, so it is not a request of its own
    wait_until(lambda: counted(app, "ClassifyStream") == {"UNAUTHENTICATED": 1}, what="the stream counted")
    assert counted(app, "ClassifyStream.request") == {"OK": 1}
    wait_until(lambda: app.servicer.active == 0, what="nothing in flight")


def test_requests_read_before_the_key_was_removed_are_still_answered(
    start_server: Any, key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "safety.service")
    app = start_server(api_key_file=str(key_file), metrics_address=None)
    sender = Sender()
    app.scheduler.hold_runner()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb2_grpc.SafetyClassifierStub(channel)
            stream = stub.ClassifyStream(iter(sender), metadata=K1, timeout=60)
            try:
                sender.send(request("read first"))
                sender.send(request("read second"))
                wait_until(lambda: in_queue(app) == 2, what="both requests queued")
                remove_k1(app, key_file)
                sender.send(request("read after the rotation"))
                wait_until(
                    lambda: any(REVOKED in r.getMessage() for r in caplog.records),
                    what="the third request refused while the first two are held",
                )
                app.scheduler.release_runner()
                answers = []
                with pytest.raises(grpc.RpcError) as err:
                    for answer in stream:
                        answers.append(answer)
            finally:
                sender.close()
    finally:
        app.scheduler.release_runner()
    assert [(a.sequence, a.HasField("response")) for a in answers] == [(0, True), (1, True)]
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "2 responses were sent" in err.value.details()
    [record] = [r for r in caplog.records if REVOKED in r.getMessage()]
    assert record.method == "ClassifyStream" and record.levelno == logging.INFO
    wait_until(lambda: counted(app, "ClassifyStream") == {"UNAUTHENTICATED": 1}, what="the stream counted")
    assert counted(app, "ClassifyStream.request") == {"OK": 2}


def test_a_removed_key_ends_an_open_reflection_stream(start_server: Any, key_file: Path) -> None:
    """Reflection is not one of our handlers (no error interceptor around it): the refusal is still
    UNAUTHENTICATED, not the UNKNOWN of an exception grpc does not know."""
    app = start_server(api_key_file=str(key_file), metrics_address=None)
    sender = Sender()
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        stream = stub.ServerReflectionInfo(iter(sender), metadata=K1, timeout=60)
        try:
            sender.send(ask)
            assert next(stream).HasField("list_services_response")
            remove_k1(app, key_file)
            sender.send(ask)
            with pytest.raises(grpc.RpcError) as err:
                next(stream)
        finally:
            sender.close()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and REVOKED in err.value.details()
    wait_until(
        lambda: counted(app, "ServerReflectionInfo") == {"UNAUTHENTICATED": 1}, what="the stream counted"
    )


def test_a_stream_whose_key_stays_is_not_ended_by_a_rotation(start_server: Any, key_file: Path) -> None:
    """Adding a key (the first step of a rotation) and removing another leave streams with a kept key open."""
    app = start_server(api_key_file=str(key_file), metrics_address=None)
    sender = Sender()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stream = pb2_grpc.SafetyClassifierStub(channel).ClassifyStream(iter(sender), metadata=K1, timeout=60)
        try:
            sender.send(request("one"))
            assert next(stream).HasField("response")
            write_keys(key_file, "k1", "k2")
            wait_until(lambda: answer_code(app.port, "k2") == grpc.StatusCode.OK, what="k2 accepted")
            sender.send(request("two"))
            assert next(stream).HasField("response")
            write_keys(key_file, "k1")  # another key removed
            refused = grpc.StatusCode.UNAUTHENTICATED
            wait_until(lambda: answer_code(app.port, "k2") == refused, what="k2 refused")
            sender.send(request("three"))
            assert next(stream).HasField("response")
        finally:
            sender.close()
        assert list(stream) == []
    wait_until(lambda: counted(app, "ClassifyStream") == {"OK": 1}, what="the stream counted")
