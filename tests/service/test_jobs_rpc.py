"""The job RPCs end to end: a real gRPC server on port 0, a fresh `redis-server` on a free port, a real
`safety worker` subprocess (tests/worker/harness.py), and `service.client.SafetyClient`."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import SafetyClient, build_items, error_details
from service.server import SafetyServer, create_server
from service.settings import ServeSettings
from service.stubs import pb2
from tests.service.details import ErrorInfo, status_of, unpacked
from tests.service.helpers import remove_k1, wait_until, write_keys
from tests.worker.harness import (
    RedisServer,
    Worker,
    assert_job_output,
    expected_lines,
    free_port,
    make_items,
    worker_env,
)
from worker.jobs import CANCELLED, NOT_SUBMITTED, JobClient
from worker.settings import WorkerSettings
from worker.store import RESULT_FIELDS, SUBMIT_STALL_S, JobKeys, JobStore, failed_line

QUEUE = "grpc-jobs"  # consumed by the module's worker
IDLE = "grpc-idle"  # consumed by nobody: jobs stay queued
CHUNK = 8
StartServer = Callable[..., SafetyServer]


def job_client(url: str, **settings: Any) -> Callable[[], JobClient]:
    return lambda: JobClient(WorkerSettings(redis_url=url, **settings))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Worker]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    w = Worker(worker_env(redis_server.url, tiny_model_dir, queue=QUEUE), log, pool="solo")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def start_jobs_server(loop_thread: Any, tiny_classifier: Any) -> Iterator[StartServer]:
    """start(job_client_factory_or_None, **settings) -> a started server sharing the tiny model."""
    started: list[SafetyServer] = []

    def start(factory: Callable[[], JobClient] | None, **overrides: Any) -> SafetyServer:
        settings = ServeSettings(address="127.0.0.1:0", metrics_address=None, **overrides)
        app = loop_thread.run(create_server(settings, tiny_classifier, job_client=factory))
        started.append(app)
        loop_thread.run(app.start())
        return app

    yield start
    for app in started:
        loop_thread.run(app.drain(0))


@pytest.fixture(scope="module")
def jobs_server(start_jobs_server: StartServer, redis_server: RedisServer) -> SafetyServer:
    return start_jobs_server(job_client(redis_server.url, queue=QUEUE, chunk_size=CHUNK))


def connect(app: SafetyServer, **kwargs: Any) -> SafetyClient:
    return SafetyClient(f"127.0.0.1:{app.port}", timeout=30, **kwargs)


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_submit_get_stream_every_item_once_in_order_equal_to_classify(
    jobs_server: SafetyServer, worker: Worker, redis_server: RedisServer, tiny_classifier: Any
) -> None:
    items = make_items(40, prefix="rpc")
    del items[3]["id"]  # no id: the item's index, as in Classify
    with connect(jobs_server) as client:
        job = client.submit_job(items, job_id="rpc-e2e")
        assert (job["job_id"], job["total"], job["chunks"], job["resumed"]) == ("rpc-e2e", 40, 5, False)
        assert job["state"] in ("queued", "running", "done") and job["created_at"] is not None
        followed = list(client.stream_job_results("rpc-e2e", wait=True, timeout=120))  # follows the job
        status = client.get_job("rpc-e2e")
        again = client.submit_job(items, job_id="rpc-e2e")
    assert (status["state"], status["done"], status["failed"], status["finished"]) == ("done", 40, 0, True)
    assert status["model"] == tiny_classifier.name, worker.text()[-2000:]
    assert status["finished_at"] >= status["started_at"] >= status["created_at"]
    assert again["resumed"] and again["state"] == "done"  # the same id and items: nothing queued twice
    assert redis_server.client().hlen(JobKeys("rpc-e2e").results) == 40

    want = expected_lines(tiny_classifier, items, CHUNK)  # after the job: two torch processes would fight
    want[3]["id"] = "3"
    assert_job_output(followed, want, tiny_classifier.thresholds)

    with connect(jobs_server) as client:  # the raw messages
        request = pb2.StreamJobResultsRequest(job_id="rpc-e2e", start_index=35)
        tail = list(client.stub.StreamJobResults(request, timeout=30))
        job_pb = client.stub.GetJob(pb2.GetJobRequest(job_id="rpc-e2e"), timeout=30)
    assert [r.index for r in tail] == [35, 36, 37, 38, 39]
    assert all(r.error == "" and r.HasField("result") and r.id == r.result.id for r in tail)
    assert [r.result.id for r in tail] == [f"rpc-{i}" for i in range(35, 40)]
    # The job ran on this server's model: LabelScore.threshold is its default threshold.
    assert {s.label: s.threshold for s in tail[0].result.scores} == pytest.approx(tiny_classifier.thresholds)
    assert [s.label for s in tail[0].result.scores] == tiny_classifier.labels
    assert job_pb.state == pb2.JOB_STATE_DONE and job_pb.HasField("finished_at") and job_pb.finished


def test_cancel_a_queued_job_then_its_items_stream_as_cancelled(
    start_jobs_server: StartServer, redis_server: RedisServer
) -> None:
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE, chunk_size=4))
    with connect(app) as client:
        job = client.submit_job(make_items(6, prefix="idle"), job_id="idle-job")
        assert (job["state"], job["chunks"], job["started_at"], job["finished"]) == ("queued", 2, None, False)
        assert list(client.stream_job_results("idle-job")) == []  # wait=false: nothing is ready yet
        code, _ = code_of(lambda: list(client.stream_job_results("idle-job", wait=True, timeout=0.5)))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # wait=true follows the job until the deadline
        cancelled = client.cancel_job("idle-job")
        lines = list(client.stream_job_results("idle-job", wait=True))
    assert (cancelled["state"], cancelled["finished"]) == ("cancelled", True)
    assert [line["index"] for line in lines] == list(range(6))
    assert all(line["error"].startswith("cancelled") and line["scores"] is None for line in lines), lines
    assert [line["id"] for line in lines] == [f"idle-{i}" for i in range(6)]
    assert redis_server.client().llen(IDLE) == 2  # each chunk queued once, skipped by a worker later


def test_items_a_cancel_stopped_before_they_were_stored_stream_without_an_id(
    start_jobs_server: StartServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their JobResult.id was the index as a string, which could be another item's real id."""
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE, chunk_size=4))
    submitter = job_client(redis_server.url, queue=IDLE, chunk_size=4)()
    upload = JobStore.upload

    def upload_then_cancel(store: JobStore, job: str, first: int, lines: bytes) -> bool:
        if first == 4:  # CancelJob arrives while the submit is about to store its second chunk
            store.cancel(job)
        return upload(store, job, first, lines)

    monkeypatch.setattr(JobStore, "upload", upload_then_cancel)
    try:
        submitted = submitter.submit(make_items(10, prefix="cut"), job_id="cut-rpc")
    finally:
        submitter.close()
    assert (submitted.status.state, submitted.sent) == ("cancelled", 1)
    with connect(app) as client:
        request = pb2.StreamJobResultsRequest(job_id="cut-rpc", wait=True)
        results = list(client.stub.StreamJobResults(request, timeout=30))
    assert [r.index for r in results] == list(range(10))
    assert [r.id for r in results] == [f"cut-{i}" for i in range(4)] + [""] * 6
    assert [r.error for r in results] == [CANCELLED] * 4 + [NOT_SUBMITTED] * 6
    assert not any(r.HasField("result") for r in results)


def test_waiting_on_a_job_whose_submission_stopped_is_a_failed_precondition(
    start_jobs_server: StartServer, redis_server: RedisServer
) -> None:
    """A submit that died half-way leaves the job `submitting`: a waiting stream followed it until its
    deadline. Now it ends FAILED_PRECONDITION, naming how to resume the job."""
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE, chunk_size=4))
    keys, r = JobKeys("stopped-job"), redis_server.client()
    with connect(app) as client:
        client.submit_job(make_items(6, prefix="stop"), job_id="stopped-job")
        r.hset(keys.job, mapping={"state": "submitting", "sent_at": repr(time.time() - SUBMIT_STALL_S - 1)})
        r.srem(keys.enqueued, 1)
        code, details = code_of(lambda: list(client.stream_job_results("stopped-job", wait=True, timeout=20)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "stopped at 4 of 6 items" in details and "--job-id stopped-job" in details


def test_delete_job_frees_a_cancelled_job_and_refuses_an_open_one(
    start_jobs_server: StartServer, redis_server: RedisServer
) -> None:
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE, chunk_size=4))
    r = redis_server.client()
    with connect(app) as client:
        client.submit_job(make_items(6, prefix="del"), job_id="delete-me")
        code, details = code_of(lambda: client.delete_job("delete-me"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cancel it first" in details, details
        assert r.exists(JobKeys("delete-me").items)
        client.cancel_job("delete-me")
        deleted = client.delete_job("delete-me")
        assert (deleted["job_id"], deleted["state"], deleted["total"]) == ("delete-me", "cancelled", 6)
        assert r.keys("safety:job:{delete-me}*") == [JobKeys("delete-me").deleted]  # the tombstone
        code, details = code_of(lambda: client.get_job("delete-me"))
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert "'delete-me' not found: it was deleted" in details
        # the id stays reserved while the deleted job's chunk messages may still be queued
        code, details = code_of(lambda: client.submit_job(make_items(3, prefix="other"), job_id="delete-me"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "use a new id" in details, details


def test_submit_job_of_a_job_another_submit_holds_is_job_busy_at_once_and_other_calls_answer(
    start_jobs_server: StartServer, redis_server: RedisServer
) -> None:
    """A stale submit lease (a replica died mid-submit): SubmitJob waited for it on a job thread, up to 32 s,
    past its caller's deadline. Eight of them all got DEADLINE_EXCEEDED, never JOB_BUSY, and held all eight
    job threads, so a GetJob on the same server timed out too. Now: UNAVAILABLE JOB_BUSY at once, with the
    lease's remaining time as the retry hint."""
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE, chunk_size=4))
    items = make_items(8, prefix="busy")
    keys, r = JobKeys("busy-job"), redis_server.client()
    with connect(app) as client:
        client.submit_job(items, job_id="busy-job")
        r.hset(keys.job, "state", "submitting")  # the dead replica had queued chunk 0 only
        r.srem(keys.enqueued, 1)
        r.set(keys.submitter, "a-dead-replicas-token", px=30_000)
        request = pb2.SubmitJobRequest(items=build_items(items), job_id="busy-job")
        submits = [client.stub.SubmitJob.future(request, timeout=10) for _ in range(12)]  # > the 8 threads
        errors = [future.exception() for future in submits]
        # the job threads are free: the 8 that waited on the lease held them for 32 s, past this deadline
        job = client.get_job("busy-job", timeout=10)
        assert job["state"] == "submitting"
        assert r.get(keys.submitter) == "a-dead-replicas-token"  # not taken: nothing was sent
        r.delete(keys.submitter)  # the lease expired: the same call resumes the job
        resumed = client.submit_job(items, job_id="busy-job")
    assert [e.code() if e else None for e in errors] == [grpc.StatusCode.UNAVAILABLE] * 12, errors
    details = error_details(errors[0])
    assert details is not None and details.reason == "JOB_BUSY", details
    # the hint, the lease's ~30 s, runs past the calls' 10 s deadline: pushback -1 ("do not retry"), so the
    # client's retry policy hands over JOB_BUSY at once instead of waiting out the deadline
    assert dict(errors[0].trailing_metadata())["grpc-retry-pushback-ms"] == "-1"
    assert 10_000 <= details.retry_after_ms <= 30_000
    message = errors[0].details()
    assert "job 'busy-job' is being submitted by another process" in message, message
    assert "(this call does not wait)" in message and re.search(r"retry after \d+s", message), message
    assert (resumed["resumed"], resumed["state"]) == (True, "queued")


def test_stream_job_results_is_counted_by_code_like_the_other_calls(
    start_jobs_server: StartServer, redis_server: RedisServer
) -> None:
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE, chunk_size=4))

    def calls(code: str, method: str = "StreamJobResults") -> float:
        labels = {"method": method, "code": code}
        return app.metrics.registry.get_sample_value("safety_requests_total", labels) or 0.0

    def timed(method: str = "StreamJobResults") -> float:
        labels = {"method": method}
        return app.metrics.registry.get_sample_value("safety_request_duration_seconds_count", labels) or 0.0

    with connect(app) as client:
        client.submit_job(make_items(6, prefix="counted"), job_id="counted-job")
        assert list(client.stream_job_results("counted-job")) == []  # OK: nothing ready yet
        code, _ = code_of(lambda: list(client.stream_job_results("counted-job", wait=True, timeout=0.5)))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        client.cancel_job("counted-job")
        assert len(list(client.stream_job_results("counted-job", wait=True))) == 6  # OK: six messages
        assert code_of(lambda: list(client.stream_job_results("no-such-job")))[0] == grpc.StatusCode.NOT_FOUND
        code, _ = code_of(lambda: list(client.stream_job_results("counted-job", 7)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    wait_until(lambda: timed() == 5, what="five StreamJobResults calls counted")
    codes = ("OK", "DEADLINE_EXCEEDED", "NOT_FOUND", "INVALID_ARGUMENT")
    assert {code: calls(code) for code in codes} == dict(zip(codes, (2, 1, 1, 1), strict=True))
    assert (calls("OK", "SubmitJob"), calls("OK", "CancelJob"), timed("SubmitJob")) == (1, 1, 1)


def test_a_finished_job_with_a_lost_result_ends_the_stream_with_not_found(
    start_jobs_server: StartServer, redis_server: RedisServer
) -> None:
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE))
    direct = JobClient(WorkerSettings(redis_url=redis_server.url))
    with connect(app) as client, contextlib.closing(direct):
        client.submit_job(["a", "b", "c"], job_id="lost-job")
        # What the workers write (every item failed here), then Redis loses one result (an eviction, a flush).
        lines = [(i, json.dumps(failed_line(i, str(i), "why")), True) for i in range(3)]
        direct.store.write("lost-job", lines)
        redis_server.client().hdel(JobKeys("lost-job").results, "1")
        job = client.get_job("lost-job")
        got: list[dict[str, Any]] = []
        code, details = code_of(lambda: got.extend(client.stream_job_results("lost-job", wait=True)))
    assert (job["state"], job["failed"]) == ("failed", 3)
    assert abs(job["finished_at"] - direct.store.server_time()) < 60  # stamped in Redis's clock
    assert code == grpc.StatusCode.NOT_FOUND and "result 1 is missing" in details, details
    assert got == [{**dict.fromkeys(RESULT_FIELDS), "index": 0, "id": "0", "error": "why"}]


def test_a_drain_ends_waiting_result_and_health_streams_at_once_saying_where_to_resume(
    start_jobs_server: StartServer, redis_server: RedisServer, loop_thread: Any
) -> None:
    """Open StreamJobResults(wait=true) and Health.Watch streams never end by themselves: the drain ends the
    first with the start_index to resume from and gives the second a short grace, not the whole drain's."""
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE))
    direct = JobClient(WorkerSettings(redis_url=redis_server.url))
    got: list[dict[str, Any]] = []
    ended: list[grpc.RpcError] = []

    def follow() -> None:
        try:
            got.extend(client.stream_job_results("drained-job", wait=True))
        except grpc.RpcError as e:
            ended.append(e)

    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    with connect(app) as client, contextlib.closing(direct), channel:
        client.submit_job(["a", "b", "c"], job_id="drained-job")
        direct.store.write("drained-job", [(0, json.dumps(failed_line(0, "0", "why")), True)])
        follower = threading.Thread(target=follow)
        follower.start()
        wait_until(lambda: len(got) == 1, what="the written result streamed")
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        start = time.monotonic()
        loop_thread.run(app.drain(30))
        took = time.monotonic() - start
        follower.join(10)
        statuses: list[int] = []
        with pytest.raises(grpc.RpcError) as watch_end:
            statuses.extend(m.status for m in watch)
    assert took < 5, f"the drain took {took:.1f} s of its 30 s grace"
    assert [e.code() for e in ended] == [grpc.StatusCode.UNAVAILABLE]
    assert "sent 1 results; resume with start_index 1" in ended[0].details()
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert watch_end.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_removed_key_ends_a_waiting_result_stream_before_its_next_result(
    start_jobs_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """StreamJobResults(wait=true) follows a job for as long as it runs: a key removed from the key file
    meanwhile gets no further result. Before, the stream went on sending the job's results to it."""
    keys = tmp_path / "api-keys"
    write_keys(keys, "k1")
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE), api_key_file=str(keys))
    direct = JobClient(WorkerSettings(redis_url=redis_server.url))
    got: list[dict[str, Any]] = []
    ended: list[grpc.RpcError] = []

    def follow() -> None:
        try:
            got.extend(client.stream_job_results("revoked-job", wait=True, timeout=60))
        except grpc.RpcError as e:
            ended.append(e)

    with connect(app, api_key="k1") as client, contextlib.closing(direct):
        client.submit_job(["a", "b", "c"], job_id="revoked-job")
        direct.store.write("revoked-job", [(0, json.dumps(failed_line(0, "0", "why")), True)])
        follower = threading.Thread(target=follow)
        follower.start()
        wait_until(lambda: len(got) == 1, what="the first result streamed")
        remove_k1(app, keys)
        direct.store.write("revoked-job", [(1, json.dumps(failed_line(1, "1", "why")), True)])
        follower.join(10)
    assert not follower.is_alive()
    assert [e.code() for e in ended] == [grpc.StatusCode.UNAUTHENTICATED], (got, ended)
    assert "API key revoked" in ended[0].details() and "1 responses were sent" in ended[0].details()
    wait_until(lambda: app.servicer.active == 0, what="the stream no longer in flight")
    labels = {"method": "StreamJobResults", "code": "UNAUTHENTICATED"}
    wait_until(  # counted after its client saw the status
        lambda: app.metrics.registry.get_sample_value("safety_requests_total", labels) == 1,
        what="the stream counted UNAUTHENTICATED",
    )


def test_unknown_jobs_are_not_found_and_bad_requests_invalid(
    jobs_server: SafetyServer, redis_server: RedisServer
) -> None:
    r = redis_server.client()
    with connect(jobs_server) as client:
        for call in (
            lambda: client.get_job("no-such-job"),
            lambda: client.cancel_job("no-such-job"),
            lambda: client.delete_job("no-such-job"),
            lambda: list(client.stream_job_results("no-such-job", wait=True)),
        ):
            code, details = code_of(call)
            assert code == grpc.StatusCode.NOT_FOUND and "no-such-job" in details, details

        bad_items: list[tuple[list[Any], str]] = [
            ([pb2.Item(text="fine"), pb2.Item(text="")], "items[1].text:"),
            ([pb2.Item(text=" "), pb2.Item(text="x")], "items[0].text:"),
            ([pb2.Item(text="fine", context="a prompt's context")], "items[0].context:"),
            ([pb2.Item(text="fine"), pb2.Item(text="x", role=7)], "items[1].role:"),
            ([pb2.Item(text="x" * 200_001)], "items[0].text:"),
            ([], "items:"),
        ]
        for items, where in bad_items:
            request = pb2.SubmitJobRequest(items=items, job_id="refused-job")
            code, details = code_of(lambda request=request: client.stub.SubmitJob(request, timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(where), (where, details)
        assert not r.exists(JobKeys("refused-job").job)  # nothing stored or queued
        assert code_of(lambda: client.get_job("refused-job"))[0] == grpc.StatusCode.NOT_FOUND

        for call, where in (
            (lambda: client.get_job(""), "job_id:"),
            (lambda: client.submit_job(["fine"], job_id="not a valid id"), "job_id:"),
        ):
            code, details = code_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(where), details

        client.submit_job(["one item"], job_id="one-item")
        code, details = code_of(lambda: client.submit_job(["other item"], job_id="one-item"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "different items" in details
        for start in (-1, 2):
            code, details = code_of(lambda start=start: list(client.stream_job_results("one-item", start)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("start_index:"), details


def test_a_submit_job_over_the_item_limit_is_refused_before_anything_is_made_of_its_items(
    start_jobs_server: StartServer,
) -> None:
    """The reviewer's reproduction, scaled down: 4M one-character items (a 19 MiB message) took a server to
    2 GiB. Over SAFETY_MAX_JOB_ITEMS (100,000 by default) SubmitJob is INVALID_ARGUMENT on `items`, before a
    dict or a line is made of an item, and before the job client is even created."""

    def no_client() -> JobClient:
        raise AssertionError("the job client was created for a request over the item limit")

    app = start_jobs_server(no_client)
    with connect(app) as client:
        assert client.stub.Info(pb2.InfoRequest(), timeout=10).limits.max_job_items == 100_000
        request = pb2.SubmitJobRequest(items=[pb2.Item(text="a")] * 100_001, job_id="too-many")
        with pytest.raises(grpc.RpcError) as err:
            client.stub.SubmitJob(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(
        "items: 100,001 items, more than the limit of 100,000 per SubmitJob request (SAFETY_MAX_JOB_ITEMS); "
    ), err.value.details()
    assert "cannot be added to later" in err.value.details() and "`safety submit`" in err.value.details()
    details = error_details(err.value)
    assert details is not None and (details.field, details.reason) == ("items", "INVALID_INPUT")


def test_the_submit_job_item_limit_is_a_setting(
    start_jobs_server: StartServer, redis_server: RedisServer
) -> None:
    app = start_jobs_server(job_client(redis_server.url, queue=IDLE, chunk_size=CHUNK), max_job_items=2)
    with connect(app) as client:
        assert client.submit_job(["one", "two"], job_id="two-items")["total"] == 2
        code, details = code_of(lambda: client.submit_job(["one", "two", "three"], job_id="three-items"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(
        "items: 3 items, more than the limit of 2"
    )
    assert not redis_server.client().exists(JobKeys("three-items").job)  # nothing stored or queued


def test_job_errors_carry_their_details(jobs_server: SafetyServer) -> None:
    """NOT_FOUND (unary and streaming RPCs) and INVALID_ARGUMENT naming `job_id` or an item's field."""
    with connect(jobs_server) as client:
        for call in (lambda: client.get_job("no-such-job"), lambda: list(client.stream_job_results("nope"))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert set(unpacked(status_of(err.value))) == {ErrorInfo}
            details = error_details(err.value)
            assert details is not None and (details.reason, details.domain) == ("JOB_NOT_FOUND", "safety.v1")
        bad = pb2.SubmitJobRequest(items=[pb2.Item(text="fine"), pb2.Item(text="")], job_id="bad-items")
        for call, field in (
            (lambda: client.get_job(""), "job_id"),
            (lambda: client.stub.SubmitJob(bad, timeout=30), "items[1].text"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            details = error_details(err.value)
            assert details is not None and (details.field, details.reason) == (field, "INVALID_INPUT")
            assert err.value.details() == f"{field}: {details.description}"


def test_redis_down_jobs_unavailable_while_classify_answers_and_the_key_is_required(
    start_jobs_server: StartServer,
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = start_jobs_server(job_client(closed), api_key="s3cret")
    with connect(app, api_key="s3cret") as client, connect(app) as anonymous:
        calls = {
            "SubmitJob": lambda c: c.submit_job(["hello"]),
            "GetJob": lambda c: c.get_job("some-job"),
            "CancelJob": lambda c: c.cancel_job("some-job"),
            "DeleteJob": lambda c: c.delete_job("some-job"),
            "StreamJobResults": lambda c: list(c.stream_job_results("some-job", wait=True)),
        }
        for name, call in calls.items():
            code, details = code_of(lambda call=call: call(client))
            assert code == grpc.StatusCode.UNAVAILABLE, (name, code, details)
            assert "unreachable" in details and "127.0.0.1" in details, (name, details)
            code, _ = code_of(lambda call=call: call(anonymous))
            assert code == grpc.StatusCode.UNAUTHENTICATED, name
        [result] = client.classify(["How do I bake bread?"])
    assert result["id"] == "0" and set(result["scores"]) == set(app.classifier.labels)


def test_a_remote_caller_never_sees_the_redis_password(
    start_jobs_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server reads the job settings on the first job call (`safety serve` checks them at start-up too)
    and sent their ConfigError verbatim as FAILED_PRECONDITION: a URL the settings refuse was quoted whole,
    and one Redis refuses was masked only up to the first '@' of its password."""
    locked = RedisServer(tmp_path / "redis").start()
    try:
        locked.client().config_set("requirepass", "the-right-one")
        urls = (
            "http://user:hunter2@redis:6379/0",
            f"redis://default:s3cr@t-hunter2@127.0.0.1:{locked.port}/0",
            # a '/' in the password: redis-py's ValueError (the password's start as a "port") was INTERNAL
            f"redis://default:Zx9kQ2mB/hunter2@127.0.0.1:{locked.port}/0",
        )
        for url in urls:
            monkeypatch.setenv("SAFETY_REDIS_URL", url)
            app = start_jobs_server(None)  # the default job client, as `safety serve` builds it
            with connect(app) as client:
                code, details = code_of(lambda client=client: client.get_job("some-job"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (url, code, details)
            assert "SAFETY_REDIS_URL" in details and "***@" in details, details
            assert "hunter2" not in details and "s3cr" not in details and "Zx9" not in details, details
    finally:
        locked.kill()


def test_without_the_worker_extra_jobs_are_unimplemented_while_classify_answers(
    start_jobs_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a server installed without `safety-classifier[worker]` sees: `import celery` fails.
    monkeypatch.delitem(sys.modules, "worker.jobs")
    monkeypatch.setitem(sys.modules, "celery", None)
    app = start_jobs_server(None)  # the default job client, as `safety serve` builds it
    with connect(app) as client:
        for call in (lambda: client.get_job("some-job"), lambda: list(client.stream_job_results("x"))):
            code, details = code_of(call)
            assert code == grpc.StatusCode.UNIMPLEMENTED and "worker extra" in details, details
        assert len(client.classify(["still classifying"])) == 1


def test_a_result_line_without_an_id_reads_as_its_index() -> None:
    """Lines written before workers named id-less items by their index hold `id: null`: JobResult.id gives the
    index, as Classify does, not ""."""
    from service.jobs import job_result_to_proto

    assert job_result_to_proto({"index": 7, "id": None, "error": "cancelled"}, {}).id == "7"
    assert job_result_to_proto({"index": 7, "id": "msg-8", "error": "cancelled"}, {}).id == "msg-8"
    # an item a cancel stopped before it was stored has no id, and no index passes for one
    unsent = job_result_to_proto(failed_line(7, None, NOT_SUBMITTED), {})
    assert (unsent.index, unsent.id, unsent.error) == (7, "", NOT_SUBMITTED)
