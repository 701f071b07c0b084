"""The library clients' retries (gRPC's retry policy, `service.client.retry_service_config`): against a
real gRPC server on port 0 that answers each call as a test scripts it, and against `safety serve`'s own
RESOURCE_EXHAUSTED when its queue is full."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from service import richstatus
from service.client import (
    MAX_ATTEMPTS,
    AsyncSafetyClient,
    SafetyClient,
    error_details,
    retry_after_ms,
    retry_service_config,
)
from service.errors import pushback_ms, trailers
from service.retries import BACKOFF_FIRST_S, BACKOFF_MAX_S
from service.richstatus import RETRY_PUSHBACK, ErrorDetails
from service.scheduler import RETRY_MAX_MS
from service.server import SafetyServer
from service.stubs import pb2, pb2_grpc
from tests.service.helpers import counted, in_queue, wait_until

UNAVAILABLE, EXHAUSTED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


class Scripted(pb2_grpc.SafetyClassifierServicer):
    """Fails each method's first calls with the codes in `failures[method]` (with a 10 ms retry hint when
    `pushback`), then answers; records every call's request."""

    def __init__(self) -> None:
        self.failures: dict[str, list[grpc.StatusCode]] = defaultdict(list)
        self.calls: dict[str, list[Any]] = defaultdict(list)
        self.pushback = False
        self._lock = threading.Lock()

    def _answer(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method].append(request)
            code = self.failures[method].pop(0) if self.failures[method] else None
        if code is not None:
            if self.pushback:
                context.set_trailing_metadata(((RETRY_PUSHBACK, "10"),))
            context.abort(code, f"scripted {code.name}")

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._answer("Classify", request, context)
        return pb2.ClassifyResponse(results=[pb2.Result(id=item.id) for item in request.items])

    def SubmitJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._answer("SubmitJob", request, context)
        return pb2.SubmitJobResponse(
            job=pb2.Job(job_id=request.job_id), resumed=len(self.calls["SubmitJob"]) > 1
        )

    def DeleteJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._answer("DeleteJob", request, context)
        return pb2.Job(job_id=request.job_id)


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb2_grpc.add_SafetyClassifierServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("pushback", [False, True], ids=["backoff", "pushback"])
def test_unavailable_and_resource_exhausted_are_retried(
    scripted: tuple[Scripted, str], pushback: bool
) -> None:
    servicer, target = scripted
    servicer.pushback = pushback
    servicer.failures["Classify"] = [UNAVAILABLE, EXHAUSTED, UNAVAILABLE]
    with SafetyClient(target, timeout=10) as client:
        [result] = client.classify([{"id": "a", "text": "hi"}])
    assert result["id"] == "a"
    assert len(servicer.calls["Classify"]) == 4  # three refusals, then the answer


def test_retries_stop_at_max_attempts(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.pushback = True
    servicer.failures["Classify"] = [UNAVAILABLE] * 10
    with SafetyClient(target, timeout=10, max_attempts=3) as client, pytest.raises(grpc.RpcError) as err:
        client.classify(["hi"])
    assert err.value.code() == UNAVAILABLE
    assert len(servicer.calls["Classify"]) == 3


def test_max_attempts_one_does_not_retry(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.failures["Classify"] = [UNAVAILABLE]
    with SafetyClient(target, timeout=10, max_attempts=1) as client, pytest.raises(grpc.RpcError) as err:
        client.classify(["hi"])
    assert err.value.code() == UNAVAILABLE
    assert len(servicer.calls["Classify"]) == 1


def test_other_errors_are_not_retried(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.failures["Classify"] = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL]
    with SafetyClient(target, timeout=10) as client:
        for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
            with pytest.raises(grpc.RpcError) as err:
                client.classify(["hi"])
            assert err.value.code() == code
    assert len(servicer.calls["Classify"]) == 2


def test_delete_job_is_not_retried(scripted: tuple[Scripted, str]) -> None:
    """A retry after a lost answer would find the job gone: DeleteJob fails with what it got."""
    servicer, target = scripted
    servicer.pushback = True
    servicer.failures["DeleteJob"] = [UNAVAILABLE]
    with SafetyClient(target, timeout=10) as client, pytest.raises(grpc.RpcError) as err:
        client.delete_job("j1")
    assert err.value.code() == UNAVAILABLE
    assert len(servicer.calls["DeleteJob"]) == 1


def test_submit_job_names_the_job_so_a_retry_resumes_it(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.pushback = True
    servicer.failures["SubmitJob"] = [UNAVAILABLE]
    with SafetyClient(target, timeout=10) as client:
        job = client.submit_job(["a", "b"])
        named = client.submit_job(["c"], job_id="mine")
    first, again, own = servicer.calls["SubmitJob"]
    assert len(first.job_id) == 32 and first.job_id == again.job_id == job["job_id"]
    assert job["resumed"]  # the server saw the same job twice
    assert own.job_id == named["job_id"] == "mine"


def test_the_retry_budget_stops_retries_on_a_server_that_keeps_failing(
    scripted: tuple[Scripted, str],
) -> None:
    """Each failed try spends a token of 10 and retries stop at half: the first call's tries use the budget,
    the next call gets one try."""
    servicer, target = scripted
    servicer.pushback = True
    servicer.failures["Classify"] = [UNAVAILABLE] * 20
    with SafetyClient(target, timeout=10) as client:
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                client.classify(["hi"])
    assert len(servicer.calls["Classify"]) == MAX_ATTEMPTS + 1


def test_the_async_client_retries(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.pushback = True
    servicer.failures["Classify"] = [UNAVAILABLE, EXHAUSTED]

    async def classify() -> list[dict[str, Any]]:
        async with AsyncSafetyClient(target, timeout=10) as client:
            return await client.classify([{"id": "x", "text": "hi"}])

    [result] = asyncio.run(classify())
    assert result["id"] == "x"
    assert len(servicer.calls["Classify"]) == 3


def test_max_attempts_is_checked() -> None:
    assert retry_service_config(1) == "{}"
    for bad in (0, 6):
        with pytest.raises(ValueError, match=r"max_attempts must be 1\.\.5"):
            retry_service_config(bad)


def test_a_full_queue_is_retried_until_it_has_room(start_server: Any) -> None:
    """`safety serve` refuses a call its full queue cannot take (RESOURCE_EXHAUSTED with a retry hint); the
    client tries again after the hint and gets its answer once the queue has room."""
    app: SafetyServer = start_server(max_queue_items=2)
    target = f"127.0.0.1:{app.port}"
    app.scheduler.hold_runner()
    released = False
    try:
        with SafetyClient(target, timeout=30) as holder, SafetyClient(target, timeout=30) as client:
            pool = futures.ThreadPoolExecutor(3)
            held = [pool.submit(holder.classify, [f"queued {i}"]) for i in range(2)]
            wait_until(lambda: in_queue(app) == 2, what="queue full")
            late = pool.submit(client.classify, [{"id": "late", "text": "one too many"}])
            wait_until(lambda: counted(app, "Classify")[EXHAUSTED.name] >= 1, what="the late call refused")
            app.scheduler.release_runner()
            released = True
            [result] = late.result(timeout=30)
            assert result["id"] == "late"
            assert all(len(f.result(timeout=30)) == 1 for f in held)
            pool.shutdown()
    finally:
        if not released:
            app.scheduler.release_runner()
    assert counted(app, "Classify")[EXHAUSTED.name] >= 1


def test_pushback_is_minus_one_when_the_hint_runs_past_the_deadline() -> None:
    assert pushback_ms(500, None) == 500  # no deadline
    assert pushback_ms(500, 0.6) == 500
    assert pushback_ms(500, 0.54) == -1  # within RETRY_MARGIN_S (50 ms) of the deadline: not worth it
    assert pushback_ms(500, 0.5) == -1  # the retry would start as the deadline passes
    assert pushback_ms(5000, 2.0) == -1


def test_without_rich_details_the_trailer_keeps_the_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server without googleapis-common-protos sends no RetryInfo: the trailer is the hint's only carrier,
    so it stays the hint even past the deadline."""
    hinted = ErrorDetails(EXHAUSTED, "full", "QUEUE_FULL", retry_after_ms=5000)
    assert dict(trailers(hinted, 1.0))[RETRY_PUSHBACK] == "-1"
    monkeypatch.setattr(richstatus, "pack", lambda details: None)
    assert trailers(hinted, 1.0) == ((RETRY_PUSHBACK, "5000"),)


def test_max_attempts_one_keeps_grpcs_transparent_retries() -> None:
    """No retry policy, but gRPC's own resend of a call that never reached a server (e.g. one that raced a
    GOAWAY) stays on: retries are not disabled on the channel."""
    with SafetyClient("127.0.0.1:1", max_attempts=1) as client:
        options = dict(client._options)
    assert options["grpc.service_config"] == "{}" and "grpc.enable_retries" not in options


def test_a_refusal_whose_hint_runs_past_the_deadline_comes_back_at_once(start_server: Any) -> None:
    """A hint longer than what is left of the call's deadline: the server sends pushback -1 (gRPC's "do not
    retry"), so the client's retry policy hands over the RESOURCE_EXHAUSTED at once instead of waiting out
    the deadline and ending DEADLINE_EXCEEDED; the details still carry the hint, which `retry_after_ms`
    reads."""
    app: SafetyServer = start_server(max_queue_items=1)
    target = f"127.0.0.1:{app.port}"
    pool = futures.ThreadPoolExecutor(1)
    with SafetyClient(target, timeout=30) as holder, SafetyClient(target, timeout=3) as client:
        app.scheduler.hold_runner()
        try:
            held = pool.submit(holder.classify, ["queued"])
            wait_until(lambda: in_queue(app) == 1, what="queue full")
            with app.scheduler._cond:  # a second per token: the hint is the cap, 5 s, past the 3 s deadline
                app.scheduler._seconds_per_token = 1.0
            with pytest.raises(grpc.RpcError) as err:
                client.classify(["one too many"])
        finally:
            app.scheduler.release_runner()
        assert len(held.result(timeout=30)) == 1
    pool.shutdown()
    assert err.value.code() == EXHAUSTED, err.value
    assert dict(err.value.trailing_metadata())[RETRY_PUSHBACK] == "-1"
    assert retry_after_ms(err.value) == RETRY_MAX_MS
    details = error_details(err.value)
    assert details is not None and details.retry_after_ms == RETRY_MAX_MS
    assert counted(app, "Classify")[EXHAUSTED.name] == 1  # one try: not retried


def test_the_channel_reconnects_as_fast_as_the_cli_retries() -> None:
    """`safety classify --remote`'s retries (service/retries.py) count on the client's reconnect backoff
    keeping up with theirs: one set of channel options serves both."""
    with SafetyClient("127.0.0.1:1") as client:
        options = dict(client._options)
    assert options["grpc.initial_reconnect_backoff_ms"] == int(BACKOFF_FIRST_S * 1000)
    assert options["grpc.max_reconnect_backoff_ms"] == int(BACKOFF_MAX_S * 1000)
