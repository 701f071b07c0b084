"""Machine-readable error details against real servers on port 0: the `grpc-status-details-bin` trailer (a
google.rpc.Status with the call's code and message, and ErrorInfo, BadRequest, RetryInfo), the same details
as plain fields of a ClassifyStream's StreamError, `service.client.error_details`, and a `safety serve`
process that cannot import googleapis-common-protos."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from service import richstatus
from service.client import AsyncSafetyClient, SafetyClient, error_details
from service.server import SafetyServer
from service.stubs import pb2
from tests.service.details import DETAILS, BadRequest, ErrorInfo, RetryInfo, status_of, unpacked
from tests.service.helpers import ExplodingLaunch, refusal, request
from tests.service.processes import serve_process

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def call_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def info_of(err: grpc.RpcError) -> Any:
    info = unpacked(status_of(err))[ErrorInfo]
    assert info.domain == "safety.v1"
    return info


@pytest.mark.parametrize(
    ("req", "field", "description"),
    [
        (request("a", "b", "c", ""), "items[3].text", "must not be empty"),
        (request("ok", thresholds={"nope": 0.5}), "thresholds.nope", "unknown label"),
        (pb2.ClassifyRequest(), "items", "at least one item is required"),
    ],
    ids=["item-3", "threshold", "no-items"],
)
def test_invalid_argument_carries_a_bad_request_naming_the_field(
    stub: Any, req: Any, field: str, description: str
) -> None:
    err = call_error(lambda: stub.Classify(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(err)
    assert status.code == 3
    details = unpacked(status)
    assert set(details) == {ErrorInfo, BadRequest}
    [violation] = details[BadRequest].field_violations
    assert violation.field == field and description in violation.description
    assert err.details() == f"{field}: {violation.description}"  # the description is the reason, no path
    assert (details[ErrorInfo].reason, details[ErrorInfo].domain) == ("INVALID_INPUT", "safety.v1")


def test_a_message_quoting_a_huge_value_stays_invalid_argument_within_the_metadata_limit(stub: Any) -> None:
    """A message quotes what was sent: a threshold label of 7,500 characters tripled the trailers (message,
    Status.message, description) past the 8 KiB a gRPC client accepts, and the call failed as
    RESOURCE_EXHAUSTED, which clients retry; every time, not 1 in 3."""
    label = "é" * 7_500  # two UTF-8 bytes each, three percent-encoded bytes per byte in grpc-message
    for _ in range(3):
        err = call_error(lambda: stub.Classify(request("ok", thresholds={label: 0.5}), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert len(err.details().encode()) <= 640 and err.details().endswith("…")
        details = unpacked(status_of(err))  # the Status repeats the clipped message exactly
        [violation] = details[BadRequest].field_violations
        assert violation.field.startswith("thresholds.éé") and len(violation.field.encode()) <= 200
        assert len(violation.description.encode()) <= 640


def test_resource_exhausted_carries_retry_info_equal_to_the_pushback(
    start_server: Any, stub_for: Any
) -> None:
    app = start_server(max_queue_items=2)
    err = refusal(app, stub_for(app))
    details = unpacked(status_of(err))
    assert set(details) == {ErrorInfo, RetryInfo} and details[ErrorInfo].reason == "QUEUE_FULL"
    pushback = int(dict(err.trailing_metadata())["grpc-retry-pushback-ms"])
    assert pushback > 0 and details[RetryInfo].retry_delay.ToMilliseconds() == pushback
    parsed = error_details(err)
    assert parsed is not None and parsed.retry_after_ms == pushback and parsed.reason == "QUEUE_FULL"


def test_unauthenticated_carries_error_info(start_server: Any, stub_for: Any) -> None:
    app = start_server(api_key="s3cret")
    err = call_error(lambda: stub_for(app).Classify(request("hi"), timeout=10))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert set(unpacked(status_of(err))) == {ErrorInfo}
    assert info_of(err).reason == "UNAUTHENTICATED"


def test_internal_carries_the_error_id_and_no_traceback(
    start_server: Any, stub_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = start_server()

    app.scheduler.clf = ExplodingLaunch(app.scheduler.clf)
    with caplog.at_level(logging.ERROR, logger="safety.service"):
        err = call_error(lambda: stub_for(app).Classify(request("hello"), timeout=10))
    assert err.code() == grpc.StatusCode.INTERNAL
    match = re.search(r"error id ([0-9a-f]{16})", err.details())
    assert match, err.details()
    info = info_of(err)
    assert info.reason == "INTERNAL" and dict(info.metadata) == {"error_id": match.group(1)}
    raw = dict(err.trailing_metadata())[DETAILS]
    assert b"kernel exploded" not in raw and b"Traceback" not in raw and b"RuntimeError" not in raw
    assert any(getattr(r, "error_id", None) == match.group(1) for r in caplog.records)


def test_unavailable_while_loading_says_model_loading(loop_thread: Any, stub_for: Any) -> None:
    from service.server import create_server
    from service.settings import ServeSettings

    app = loop_thread.run(create_server(ServeSettings(address="127.0.0.1:0", metrics_address=None)))
    loop_thread.run(app.server.start())  # serving, but no model attached yet
    try:
        err = call_error(lambda: stub_for(app).Info(pb2.InfoRequest(), timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert info_of(err).reason == "MODEL_LOADING"
    finally:
        loop_thread.run(app.drain(0))


def test_a_stream_request_error_has_the_field_and_reason(server: SafetyServer) -> None:
    requests = [
        request("fine"),
        request("ok", "", "ok"),
        pb2.ClassifyRequest(items=[pb2.Item(text="x", role=pb2.ROLE_PROMPT, context="not on prompts")]),
        request("ok", thresholds={"nope": 0.5}),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = list(pb2_stub(channel).ClassifyStream(iter(requests), timeout=30))
    assert [r.WhichOneof("outcome") for r in replies] == ["response", "error", "error", "error"]
    errors = [r.error for r in replies[1:]]
    assert [e.field for e in errors] == ["items[1].text", "items[0].context", "thresholds.nope"]
    assert all(e.reason == "INVALID_INPUT" and e.retry_after_ms == 0 for e in errors)
    assert all(e.message.startswith(f"{e.field}: ") for e in errors)
    with SafetyClient(f"127.0.0.1:{server.port}") as client:  # and the client's dicts
        [ok, bad] = client.classify_stream([["fine"], ["ok", ""]])
    assert ok["error"] is None
    assert bad["error"]["field"] == "items[1].text" and bad["error"]["reason"] == "INVALID_INPUT"
    assert bad["error"]["retry_after_ms"] is None and bad["error"]["metadata"] == {}


def pb2_stub(channel: grpc.Channel) -> Any:
    from service.stubs import pb2_grpc

    return pb2_grpc.SafetyClassifierStub(channel)


def test_the_client_helper_reads_the_details_of_both_clients(server: SafetyServer) -> None:
    target = f"127.0.0.1:{server.port}"
    with SafetyClient(target) as client:
        err = call_error(lambda: client.classify(["a", "b", "c", " "]))
    details = error_details(err)
    assert details is not None
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.message == err.details()
    assert (details.field, details.reason, details.domain) == ("items[3].text", "INVALID_INPUT", "safety.v1")
    assert details.description.startswith("must not be blank") and details.retry_after_ms is None

    async def refused() -> grpc.RpcError:
        async with AsyncSafetyClient(target) as client:
            try:
                await client.classify([], thresholds={"hate": 2.0})
            except grpc.RpcError as e:
                return e
        raise AssertionError("an empty request was accepted")

    details = error_details(asyncio.run(refused()))  # grpc.aio's error: its trailers are an aio Metadata
    assert details is not None and details.field == "items" and details.reason == "INVALID_INPUT"


class FakeError(grpc.RpcError):
    """An RpcError as grpc's own, with the given status and trailers."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, Any], ...]) -> None:
        self._code, self._message, self._trailers = code, message, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailers


def test_the_client_helper_without_details_and_with_a_rewritten_status() -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    sent = richstatus.ErrorDetails(exhausted, "queue full", "QUEUE_FULL", retry_after_ms=1234)
    packed = richstatus.pack(sent)
    assert packed is not None
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert error_details(FakeError(unavailable, "no details", (("grpc-retry-pushback-ms", "5"),))) is None
    details = error_details(FakeError(exhausted, "queue full", ((DETAILS, packed),)))
    assert details is not None and details.retry_after_ms == 1234 and details.field == ""
    with pytest.raises(ValueError, match="but the call ended with UNAVAILABLE"):  # a proxy rewrote it
        error_details(FakeError(unavailable, "upstream reset", ((DETAILS, packed),)))
    with pytest.raises(ValueError, match=r"not a google\.rpc\.Status"):
        error_details(FakeError(unavailable, "x", ((DETAILS, b"\xff\xff\xff"),)))
    corrupt = status_pb2.Status(code=14, message="x")  # an ErrorInfo whose bytes do not parse
    corrupt.details.add(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff\xff")
    with pytest.raises(ValueError, match=r"google\.rpc\.ErrorInfo that does not parse"):
        error_details(FakeError(unavailable, "x", ((DETAILS, corrupt.SerializeToString()),)))


def test_every_error_class_has_a_documented_reason() -> None:
    from model import errors
    from service.errors import INTERNAL_REASON, REASONS, describe

    reasons = {reason for _, reason in REASONS} | {INTERNAL_REASON}
    docs = DOCS.read_text()
    section = docs[docs.index("## Error details") :]
    for reason in reasons:
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", reason), reason
        assert f"`{reason}`" in section, f"{reason} is not in docs/api.md's Error details"
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.SafetyError) and cls is not errors.SafetyError:
            assert any(issubclass(cls, c) for c, _ in REASONS), cls
    # the three kinds of UNAVAILABLE a caller may act on, told apart by class, not by message
    assert describe(errors.DeviceFailedError("x")).reason == "DEVICE_FAILED"
    assert describe(errors.ShuttingDownError("x")).reason == "SHUTTING_DOWN"
    assert describe(errors.UnavailableError("Redis at x is unreachable")).reason == "BACKEND_UNAVAILABLE"
    busy = describe(errors.JobBusyError("job 'x' is being submitted by another process"))  # retry: it resumes
    assert (busy.code, busy.reason) == (grpc.StatusCode.UNAVAILABLE, "JOB_BUSY")


def test_without_the_package_the_pushback_stays_and_the_details_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """What service/richstatus.py's failed import leaves (the process test below makes the import fail)."""
    from model.errors import OverloadedError
    from service.errors import describe, trailers

    refused = describe(OverloadedError("queue full", retry_after_ms=120))
    assert dict(trailers(refused)).keys() == {"grpc-retry-pushback-ms", DETAILS}
    monkeypatch.setattr(richstatus, "status_pb2", None)
    assert trailers(refused) == (("grpc-retry-pushback-ms", "120"),)


BOOTSTRAP = (
    "import sys; sys.modules['google.rpc'] = None; "  # `from google.rpc import ...` raises ImportError
    "from model.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.slow
def test_a_server_without_googleapis_common_protos_sends_status_and_message_only(
    tiny_model_dir: Path,
) -> None:
    env = {**os.environ, "SAFETY_LOG_FORMAT": "json", "SAFETY_METRICS_ADDRESS": "off", "SAFETY_DEVICE": "cpu"}
    args = ["--model", str(tiny_model_dir), "--address", "127.0.0.1:0", "--drain-grace-s", "5"]
    with serve_process(args, env, command=[sys.executable, "-c", BOOTSTRAP]) as served:
        port = served.log("listening")["port"]
        served.log("serving")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb2_stub(channel)
            for _ in range(3):
                err = call_error(lambda: stub.Classify(request("a", "b", "c", ""), timeout=10))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.details() == "items[3].text: must not be empty"
                assert DETAILS not in dict(err.trailing_metadata() or ())
                assert error_details(err) is None
            replies = list(stub.ClassifyStream(iter([request("ok", "")]), timeout=10))
        # the stream's fields need no googleapis-common-protos
        assert (replies[0].error.field, replies[0].error.reason) == ("items[1].text", "INVALID_INPUT")
        served.stop()
    off = [r for r in served.seen if "rich error details" in str(r.get("msg", r))]
    assert len(off) == 1, off  # once, at start-up: not per call
    assert off[0]["level"] == "WARNING" and "googleapis-common-protos is not installed" in off[0]["msg"]


def test_an_input_over_a_size_limit_names_the_limit_for_programs(server: SafetyServer, stub: Any) -> None:
    """ErrorInfo.metadata of a size limit: "limit", "value" and "setting", on the trailer and on a stream's
    StreamError, so a client can split and retry without parsing the message. Other input errors: none."""
    s = server.settings
    cases = [
        (request(*(["x"] * (s.max_items + 1))), s.max_items, s.max_items + 1, "SAFETY_MAX_ITEMS"),
        (request("ok", "y" * (s.max_text_chars + 1)), s.max_text_chars, s.max_text_chars + 1,
         "SAFETY_MAX_TEXT_CHARS"),
    ]  # fmt: skip
    for req, limit, value, setting in cases:
        info = info_of(call_error(lambda r=req: stub.Classify(r, timeout=10)))
        assert dict(info.metadata) == {"limit": str(limit), "value": str(value), "setting": setting}
    assert not info_of(call_error(lambda: stub.Classify(request("a", ""), timeout=10))).metadata
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = list(pb2_stub(channel).ClassifyStream(iter([cases[0][0], request("a", "")]), timeout=30))
    assert dict(replies[0].error.metadata) == {
        "limit": str(s.max_items), "value": str(s.max_items + 1), "setting": "SAFETY_MAX_ITEMS"
    }  # fmt: skip
    assert not replies[1].error.metadata


def test_every_size_limit_error_carries_its_limit() -> None:
    """The limits not reached through Classify above: SubmitJob's items, the message size, the queue bound."""
    from model.errors import InvalidInputError
    from service.decoding import Oversized
    from service.errors import describe
    from service.jobs import check_job_size

    with pytest.raises(InvalidInputError) as job:
        check_job_size(11, 10)
    errors = [
        (job.value, {"limit": "10", "value": "11", "setting": "SAFETY_MAX_JOB_ITEMS"}),
        (Oversized("Classify", 2_000, 1_000).error(),
         {"limit": "1000", "value": "2000", "setting": "SAFETY_MAX_MESSAGE_BYTES"}),
    ]  # fmt: skip
    for exc, metadata in errors:
        assert describe(exc).metadata == metadata
