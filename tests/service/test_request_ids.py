"""Request ids (`x-request-id`, service/requestid.py) and the access log (SAFETY_ACCESS_LOG), on real
servers on port 0: every answer's trailers carry the call's id (the caller's, or one the server made), the
log lines made while serving the call carry it too, and the access log has a line per call (or per failed
call)."""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
import pytest

from model.errors import InvalidInputError, UnavailableError
from service.client import SafetyClient
from service.requestid import MAX_LENGTH, REQUEST_ID_KEY, request_id
from service.server import create_server
from service.settings import ServeSettings
from service.stubs import pb2, pb2_grpc
from tests.service.helpers import ExplodingLaunch, request, wait_until

HEX32 = re.compile(r"[0-9a-f]{32}")


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "safety.access"]


def test_the_callers_id_is_kept_when_it_is_short_printable_ascii() -> None:
    assert request_id([("authorization", "Bearer k"), (REQUEST_ID_KEY, "gw-7f3a/1")]) == "gw-7f3a/1"
    assert request_id([(REQUEST_ID_KEY, "x" * MAX_LENGTH)]) == "x" * MAX_LENGTH
    for bad in ("", "x" * (MAX_LENGTH + 1), "tab\there", "naïve", "line\nbreak"):
        made = request_id([(REQUEST_ID_KEY, bad)])
        assert HEX32.fullmatch(made), (bad, made)
    assert HEX32.fullmatch(request_id(None)) and request_id(()) != request_id(())


def test_every_answer_carries_the_calls_id_and_all_calls_are_logged(
    start_server: Any, stub_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = start_server(access_log="all")
    stub = stub_for(app)
    caplog.set_level(logging.INFO, logger="safety.access")
    _, call = stub.Classify.with_call(request("hello"), metadata=[(REQUEST_ID_KEY, "gw-1")], timeout=30)
    assert dict(call.trailing_metadata())[REQUEST_ID_KEY] == "gw-1"
    _, call = stub.Classify.with_call(request("hello"), timeout=30)  # no id: the server makes one
    made = dict(call.trailing_metadata())[REQUEST_ID_KEY]
    assert HEX32.fullmatch(made), made
    with pytest.raises(grpc.RpcError) as err:  # an error's trailers: its details and the id
        stub.Classify(request(""), metadata=[(REQUEST_ID_KEY, "gw-2")], timeout=30)
    trailers = dict(err.value.trailing_metadata())
    assert trailers[REQUEST_ID_KEY] == "gw-2" and "grpc-status-details-bin" in trailers
    with SafetyClient(f"127.0.0.1:{app.port}", timeout=30) as client:
        client.classify(["hello"], request_id="gw-3")
    # a failed call's line is written once its handler has ended, which may be after the client has the
    # status (grpc.aio sends an abort's status first)
    wait_until(lambda: len(access_lines(caplog)) == 4, what="four access lines")
    lines = [(r.method, r.code, r.request_id) for r in access_lines(caplog)]
    assert lines == [
        ("Classify", "OK", "gw-1"),
        ("Classify", "OK", made),
        ("Classify", "INVALID_ARGUMENT", "gw-2"),
        ("Classify", "OK", "gw-3"),
    ]
    first = access_lines(caplog)[0]
    assert first.ms > 0 and first.peer.startswith("ipv4:127.0.0.1:"), vars(first)


def test_errors_mode_logs_only_the_calls_that_did_not_end_ok(
    start_server: Any, stub_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = start_server(access_log="errors")
    stub = stub_for(app)
    caplog.set_level(logging.INFO, logger="safety.access")
    stub.Classify(request("fine"), metadata=[(REQUEST_ID_KEY, "ok-call")], timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Classify(
            request("x", thresholds={"no-such-label": 0.5}), metadata=[(REQUEST_ID_KEY, "bad")], timeout=30
        )
    wait_until(lambda: access_lines(caplog) != [], what="the failed call's access line")
    assert [(r.code, r.request_id) for r in access_lines(caplog)] == [("INVALID_ARGUMENT", "bad")]


def test_the_default_is_no_access_log(server: Any, stub_for: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="safety.access")
    with pytest.raises(grpc.RpcError):
        stub_for(server).Classify(request(""), timeout=30)
    assert access_lines(caplog) == []


def test_an_internal_errors_log_line_carries_the_request_id(
    start_server: Any, stub_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The log line of an INTERNAL answer (its traceback, under the error id the caller sees) names the
    call's request id, so a gateway's record of the call leads to it."""
    app = start_server()
    app.scheduler.clf = ExplodingLaunch(app.scheduler.clf)
    caplog.set_level(logging.ERROR)
    with pytest.raises(grpc.RpcError) as err:
        stub_for(app).Classify(request("boom"), metadata=[(REQUEST_ID_KEY, "gw-boom")], timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert dict(err.value.trailing_metadata())[REQUEST_ID_KEY] == "gw-boom"
    [line] = [r for r in caplog.records if r.getMessage().startswith("internal error")]
    assert line.request_id == "gw-boom" and line.error_id in err.value.details()


def test_a_bad_access_log_mode_is_refused() -> None:
    with pytest.raises(
        InvalidInputError, match=r"SAFETY_ACCESS_LOG: must be off, errors or all, got 'verbose'"
    ):
        ServeSettings(access_log="verbose")


def test_the_client_refuses_an_id_the_server_would_not_keep_before_sending() -> None:
    """gRPC fails a call whose header holds a control or non-ASCII character (INTERNAL "Invalid metadata"),
    losing the classification: the client says what is wrong with the id instead, before any call."""
    with SafetyClient("127.0.0.1:1", timeout=1) as client:
        for bad in ("héllo", "tab\tid", "", "x" * (MAX_LENGTH + 1)):
            with pytest.raises(ValueError, match=r"request_id: must be 1 to 128 printable ASCII characters"):
                client.classify(["text"], request_id=bad)


def test_the_job_clients_lines_on_its_pool_threads_carry_the_calls_request_id(
    loop_thread: Any, tiny_classifier: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The job RPCs run the job client (made on first use; its Redis calls and their retry warnings) on a
    pool thread: a line logged there names the call's request id, like the lines of the call's own task."""
    jobs_log = logging.getLogger("tests.jobs")

    class Client:
        def submit(self, items: Any, **kwargs: Any) -> Any:
            jobs_log.warning("Redis unreachable, retrying")
            raise UnavailableError("Redis at redis://r:6379/0 is unreachable")

        def close(self) -> None:
            pass

    def factory() -> Client:
        jobs_log.info("job client made")
        return Client()

    caplog.set_level(logging.INFO, logger="tests.jobs")
    settings = ServeSettings(address="127.0.0.1:0", metrics_address=None)
    app = loop_thread.run(create_server(settings, tiny_classifier, job_client=factory))
    loop_thread.run(app.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb2_grpc.SafetyClassifierStub(channel)
            for job in ("job-1", "job-2"):
                with pytest.raises(grpc.RpcError) as err:
                    stub.SubmitJob(
                        pb2.SubmitJobRequest(items=[pb2.Item(text="a")], job_id=job),
                        metadata=[(REQUEST_ID_KEY, f"gw-{job}")], timeout=30,
                    )  # fmt: skip
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    finally:
        loop_thread.run(app.drain(0))
    ours = [r for r in caplog.records if r.name == "tests.jobs"]
    assert [(r.getMessage(), r.threadName.split("_")[0], r.request_id) for r in ours] == [
        ("job client made", "safety-jobs", "gw-job-1"),
        ("Redis unreachable, retrying", "safety-jobs", "gw-job-1"),
        ("Redis unreachable, retrying", "safety-jobs", "gw-job-2"),
    ]


def test_a_line_logged_while_tokenizing_carries_the_calls_request_id(
    start_server: Any, stub_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokenization runs on the scheduler's pool threads, in a copy of the call's context."""
    encode_log = logging.getLogger("tests.encode")

    class LoggingEncode:
        def __init__(self, clf: Any) -> None:
            self._clf = clf

        def __getattr__(self, name: str) -> Any:
            return getattr(self._clf, name)

        def encode(self, items: Any) -> Any:
            encode_log.info("encoding %d items", len(items))
            return self._clf.encode(items)

    app = start_server()
    app.scheduler.clf = LoggingEncode(app.scheduler.clf)
    caplog.set_level(logging.INFO, logger="tests.encode")
    stub = stub_for(app)
    for rid in ("gw-a", "gw-b"):
        stub.Classify(request("fine"), metadata=[(REQUEST_ID_KEY, rid)], timeout=30)
    ours = [r for r in caplog.records if r.name == "tests.encode"]
    assert [(r.request_id, r.threadName == "MainThread") for r in ours] == [("gw-a", False), ("gw-b", False)]
