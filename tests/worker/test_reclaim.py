"""Lost chunk messages: kombu's Redis transport loses a message taken by a worker that dies before recording
it as unacknowledged. The sweeper finds stalled jobs whose chunks have no message anywhere in the broker and
sends those chunks again; everything else is left alone. Real Redis, real Celery messages, real workers."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.worker.harness import RedisServer, Worker, assert_job_output, expected_lines, make_items, poll
from worker import reclaim
from worker.app import chunk_task_id
from worker.jobs import JobClient
from worker.reclaim import UNACKED, Resent, Sweeper, broker_task_ids, sweep
from worker.store import SUBMIT_STALL_S, JobKeys, JobStore

QUEUE = "q"


def take_message(server: RedisServer, job: str, chunk: int) -> str:
    """Remove the chunk's message from the queue list, as a BRPOP does; returns it."""
    r = server.client()
    for raw in r.lrange(QUEUE, 0, -1):
        if json.loads(raw)["headers"]["id"] == chunk_task_id(job, chunk):
            assert r.lrem(QUEUE, 1, raw) == 1
            return raw
    raise AssertionError(f"no message for {job} chunk {chunk}")


def stalled_sweep(store: JobStore, sent: list[tuple[str, int, str]], *, later: float = 100.0) -> list[Resent]:
    return sweep(
        store,
        lambda job, chunk, queue, nonce: sent.append((job, chunk, queue)),
        now=time.time() + later,
        stall_s=50.0,
        task_id=chunk_task_id,
    )


def test_only_a_stalled_chunk_with_no_message_anywhere_is_sent_again(
    redis_server: RedisServer, job_client: Callable[..., JobClient]
) -> None:
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    job = client.submit(make_items(8), job_id="lost").status.job_id  # chunks 0..3, no worker running
    store, r = JobStore(redis_server.client()), redis_server.client()
    assert store.active() == ["lost"] and store.incomplete_chunks(job) == [0, 1, 2, 3]

    lost = take_message(redis_server, job, 1)  # taken, then the worker died: gone from the broker
    held = take_message(redis_server, job, 2)  # taken and recorded by a live worker: in `unacked`
    r.hset(UNACKED, "tag-2", json.dumps([json.loads(held), "", QUEUE]))
    r.lpush(QUEUE, "not a celery message")  # other producers' junk is ignored
    assert broker_task_ids(r, [QUEUE]) == {chunk_task_id(job, c) for c in (0, 2, 3)}

    sent: list[tuple[str, int, str]] = []
    assert stalled_sweep(store, sent, later=0.0) == []  # the job made progress just now: not stalled
    assert stalled_sweep(store, sent) == [Resent(job, 1)]
    assert sent == [(job, 1, QUEUE)]

    nonce = r.hget(JobKeys(job).job, "nonce")
    reclaim.resender(client.app)(job, 1, QUEUE, nonce)  # what the worker's sweeper does
    queued = {json.loads(raw)["headers"]["id"] for raw in r.lrange(QUEUE, 0, -1) if raw.startswith("{")}
    assert queued == {chunk_task_id(job, c) for c in (0, 1, 3)}
    assert json.loads(lost)["headers"]["id"] == chunk_task_id(job, 1)
    assert stalled_sweep(store, sent) == [] and len(sent) == 1  # its message exists again


def message_args(raw: str) -> list[Any]:
    return json.loads(base64.b64decode(json.loads(raw)["body"]))[0]


def test_a_lost_chunk_is_sent_again_with_its_jobs_nonce(
    redis_server: RedisServer, job_client: Callable[..., JobClient]
) -> None:
    """The sweeper sent a lost chunk again as (job id, chunk), without the nonce that ties the message to its
    job: re-sent, it would act on any job of that id. A record without a nonce (the previous release's)
    gets the message that release sent."""
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    for job in ("current", "legacy"):
        client.submit(make_items(4), job_id=job)
    r = redis_server.client()
    r.hdel(JobKeys("legacy").job, "nonce")  # as if created by the previous release
    take_message(redis_server, "current", 1)
    take_message(redis_server, "legacy", 0)
    sweeper = Sweeper(JobStore(r), reclaim.resender(client.app), chunk_task_id, stall_s=-1.0, interval_s=30.0)
    assert set(sweeper.run_once()) == {Resent("current", 1), Resent("legacy", 0)}
    sent = {json.loads(raw)["headers"]["id"]: message_args(raw) for raw in r.lrange(QUEUE, 0, 1)}
    assert sent == {
        chunk_task_id("current", 1): ["current", 1, r.hget(JobKeys("current").job, "nonce")],
        chunk_task_id("legacy", 0): ["legacy", 0],
    }


def test_finished_expired_and_submitting_jobs(
    redis_server: RedisServer, job_client: Callable[..., JobClient]
) -> None:
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    for name in ("cancelled", "expired", "submitting"):
        client.submit(make_items(4), job_id=name)
    store, r = JobStore(redis_server.client()), redis_server.client()
    client.cancel("cancelled")
    r.delete(*JobKeys("expired").all())
    r.hset(JobKeys("submitting").job, "state", "submitting")  # its submitter is still sending chunks
    r.delete(QUEUE)  # every message lost: only the submitting job would qualify, and it is left alone
    sent: list[tuple[str, int, str]] = []
    assert stalled_sweep(store, sent) == [] and sent == []
    assert store.active() == ["submitting"]


def test_a_job_whose_submission_stopped_leaves_the_open_list_until_it_is_resumed(
    redis_server: RedisServer, job_client: Callable[..., JobClient]
) -> None:
    """An interrupted submit left the job `submitting`: it kept `safety:jobs:open` non-empty (a KEDA-scaled
    worker up) for the whole TTL. Resubmitting puts it back."""
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    items = make_items(6)
    client.submit(items, job_id="abandoned")
    store, r = JobStore(redis_server.client()), redis_server.client()
    r.hset(JobKeys("abandoned").job, "state", "submitting")  # chunk 2 never sent, its submitter gone
    r.srem(JobKeys("abandoned").enqueued, 2)
    sent: list[tuple[str, int, str]] = []
    assert stalled_sweep(store, sent, later=SUBMIT_STALL_S - 5) == [] and store.active() == ["abandoned"]
    assert stalled_sweep(store, sent, later=SUBMIT_STALL_S + 5) == [] and sent == []
    assert store.active() == []
    resumed = client.submit(items, job_id="abandoned")
    assert (resumed.resumed, resumed.sent, resumed.status.state) == (True, 1, "queued")
    assert store.active() == ["abandoned"]


def stop_submitting(r: Any, job: str, chunk: int) -> None:
    """An interrupted submit: `chunk` never sent, its submitter gone for over SUBMIT_STALL_S."""
    seconds, micros = r.time()
    stale = repr(seconds + micros / 1e6 - SUBMIT_STALL_S - 1)
    r.hset(JobKeys(job).job, mapping={"state": "submitting", "sent_at": stale})
    r.srem(JobKeys(job).enqueued, chunk)


def test_a_resumed_submit_is_watched_from_the_start(
    redis_server: RedisServer, job_client: Callable[..., JobClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep between a resume's `mark_active` (a no-op: the id still listed) and its first upload saw the
    old `sent_at` and dropped the job from the open list while its chunks were being queued."""
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    items = make_items(6)
    client.submit(items, job_id="resumed")
    store, r = JobStore(redis_server.client()), redis_server.client()
    stop_submitting(r, "resumed", 2)
    enqueued, during = JobStore.enqueued, []

    def sweep_first(self: JobStore, job_id: str) -> set[int]:  # _enqueue's first call, before any upload
        sweep(store, lambda *a: None, now=store.server_time(), stall_s=60.0, task_id=chunk_task_id)
        during.append(store.active())
        return enqueued(self, job_id)

    monkeypatch.setattr(JobStore, "enqueued", sweep_first)
    resumed = client.submit(items, job_id="resumed")
    assert (resumed.resumed, resumed.sent, resumed.status.state) == (True, 1, "queued")
    assert during == [["resumed"]] and store.active() == ["resumed"]


def test_a_submit_that_paused_past_the_stall_limit_is_watched_again_once_it_goes_on(
    redis_server: RedisServer, job_client: Callable[..., JobClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live submitter paused over SUBMIT_STALL_S (Ctrl-Z, a sleeping laptop) was dropped from the open list
    and never put back after it went on and sealed the job."""
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    store = JobStore(redis_server.client())
    upload = JobStore.upload

    def pause_at_chunk_2(self: JobStore, job: str, first: int, items: Any) -> bool:
        if first == 4:  # a sweep round 121 s into the pause
            later = store.server_time() + SUBMIT_STALL_S + 1
            sweep(store, lambda *a: None, now=later, stall_s=60.0, task_id=chunk_task_id)
            assert store.active() == []
        return upload(self, job, first, items)

    monkeypatch.setattr(JobStore, "upload", pause_at_chunk_2)
    submitted = client.submit(make_items(6), job_id="paused")
    assert (submitted.sent, submitted.status.state) == (3, "queued")
    assert store.active() == ["paused"]


def test_a_job_submitted_again_while_the_sweeper_drops_it_stays_watched(
    redis_server: RedisServer, job_client: Callable[..., JobClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper read a stopped (or expired) job, then a submit resumed (or recreated) it and found the id
    still listed, then the sweeper removed the id: the running job was off the open list for good."""
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    items = make_items(6)
    store, r = JobStore(redis_server.client()), redis_server.client()
    client.submit(items, job_id="stopped")
    stop_submitting(r, "stopped", 2)
    client.submit(items, job_id="expired")
    r.delete(*JobKeys("expired").all())
    forget = JobStore.forget_active

    def submit_first(self: JobStore, job_id: str) -> None:  # the submit lands between the read and the LREM
        if job_id == "stopped":
            r.hset(JobKeys(job_id).job, "sent_at", repr(store.server_time()))  # its resume's progress
        else:
            client.store.create(job_id, {"state": "submitting", "sent_at": "0", "ttl_s": 100, "digest": "d"})
        client.store.mark_active(job_id)  # a no-op: the id is still listed
        forget(self, job_id)

    monkeypatch.setattr(JobStore, "forget_active", submit_first)
    sweep(store, lambda *a: None, now=store.server_time(), stall_s=60.0, task_id=chunk_task_id)
    assert store.active() == ["expired", "stopped"]


def test_one_sweeper_at_a_time(redis_server: RedisServer, job_client: Callable[..., JobClient]) -> None:
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    job = client.submit(make_items(4), job_id="locked").status.job_id
    take_message(redis_server, job, 0)
    sent: list[tuple[str, int, str]] = []
    counted: list[int] = []

    def make() -> Sweeper:
        return Sweeper(
            JobStore(redis_server.client()),
            lambda job, chunk, queue, nonce: sent.append((job, chunk, queue)),
            chunk_task_id,
            stall_s=-1.0,  # everything counts as stalled
            interval_s=30.0,
            on_resent=counted.append,
        )

    first, second = make(), make()
    assert first.run_once() == [Resent(job, 0)] and counted == [1]
    assert second.run_once() == [] and second.rounds == 0  # the first holds the lock
    assert first.run_once() == [Resent(job, 0)] and first.rounds == 2  # its holder keeps sweeping


def test_a_job_whose_message_the_broker_lost_still_completes(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
) -> None:
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=10)
    items = make_items(40, prefix="lost")
    job = client.submit(items, job_id="lost-message").status.job_id
    take_message(redis_server, job, 2)
    # 10 s: more than a cold worker's first delivery takes to load its model (5.6 s on the CI VM)
    start_worker(redis_server.url, queue=QUEUE, visibility_timeout_s=10, max_attempts=20)
    status = client.wait(job, timeout=120)
    assert (status.state, status.done, status.failed) == ("done", 40, 0)
    assert_job_output(list(client.results(job, timeout=30)), expected_lines(tiny_classifier, items, 10),
                      tiny_classifier.thresholds)  # fmt: skip
    attempts = {int(c): int(n) for c, n in redis_server.client().hgetall(JobKeys(job).attempts).items()}
    assert attempts == {0: 1, 1: 1, 2: 1, 3: 1}  # the lost chunk ran once, after the sweeper sent it again
    store = JobStore(redis_server.client())
    poll(lambda: store.active() == [], 30, "the sweeper to drop the finished job from the active set")


def test_a_long_backlog_is_read_at_most_once_per_stall_period(
    redis_server: RedisServer, job_client: Callable[..., JobClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reclaim, "LONG_BACKLOG", 2)  # the 3 messages left count as a long backlog
    client = job_client(redis_server.url, queue=QUEUE, chunk_size=2)
    job = client.submit(make_items(8), job_id="backlog").status.job_id
    r = redis_server.client()
    r.hset(JobKeys(job).job, mapping={"created": "0", "updated": "0"})  # stalled long ago
    take_message(redis_server, job, 0)

    sweeper = Sweeper(
        JobStore(r), reclaim.resender(client.app), chunk_task_id, stall_s=1000.0, interval_s=30.0
    )
    assert sweeper.run_once() == [Resent(job, 0)]
    take_message(redis_server, job, 1)  # lost too, but the (long) backlog was read a moment ago
    assert sweeper.run_once() == [] and sweeper.rounds == 2
    monkeypatch.setattr(reclaim, "LONG_BACKLOG", 10_000)  # a short backlog is read every round
    assert sweeper.run_once() == [Resent(job, 1)]
