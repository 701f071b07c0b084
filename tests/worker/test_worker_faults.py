"""Failures with real processes: kill -9 of a worker mid-job, chunks that always crash, Redis restarts.

Each test starts its own `redis-server` and `celery worker` subprocesses. The fault hook
(`SAFETY_TEST_FAULT`, worker/faults.py) makes a chosen chunk hang (so a kill lands mid-chunk), exit or raise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from model.errors import NotFoundError, UnavailableError
from tests.worker.harness import (
    REPO,
    RedisServer,
    Worker,
    assert_job_output,
    assert_same_line,
    expected_lines,
    make_items,
    poll,
    worker_env,
)
from worker.jobs import JobClient
from worker.store import DEAD_LETTER, JobKeys

pytestmark = pytest.mark.slow  # real worker processes, killed, and visibility timeouts waited out

# Kill tests: a short visibility timeout so a dead worker's chunk comes back fast, and enough attempts that a
# slow chunk on a busy machine (redelivered while still running) can never dead-letter by accident.
# The timeout must outlast a cold worker's first delivery, which imports torch and loads the model before
# its first hold renewal: 5.6 s measured on the 2-core CI VM (at 4 s, a live worker's first chunk was handed
# to a second delivery, attempts {0: 2}).
FAST_REDELIVERY = {"visibility_timeout_s": 10, "max_attempts": 20}


def hang(job: str, chunk: int, fault_dir: Path) -> dict[str, str]:
    return {"test_fault": f"{job}:{chunk}:hang", "test_fault_dir": str(fault_dir)}


def attempts(server: RedisServer, job: str) -> dict[int, int]:
    return {int(c): int(n) for c, n in server.client().hgetall(JobKeys(job).attempts).items()}


def check_complete(
    client: JobClient, job: str, items: list[dict[str, str]], chunk_size: int, clf: Any
) -> None:
    status = client.wait(job, timeout=180)
    assert (status.state, status.done, status.failed) == ("done", len(items), 0)
    lines = list(client.results(job, timeout=30))
    assert_job_output(lines, expected_lines(clf, items, chunk_size), clf.thresholds)


def test_kill9_of_the_worker_inside_the_first_chunk_then_a_new_worker_finishes_the_job(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
    tmp_path: Path,
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=40)
    items, job = make_items(160, prefix="first"), "kill-first"
    fault = hang(job, 0, tmp_path)
    first = start_worker(redis_server.url, pool="solo", queue="q", **FAST_REDELIVERY, **fault)
    client.submit(items, job_id=job)
    poll(lambda: (tmp_path / f"{job}.0.hang").exists(), 120, "the worker to be inside chunk 0")
    assert client.status(job).done == 0
    first.kill9()
    start_worker(redis_server.url, queue="q", **FAST_REDELIVERY)
    check_complete(client, job, items, 40, tiny_classifier)
    assert attempts(redis_server, job) == {0: 2, 1: 1, 2: 1, 3: 1}  # the killed delivery, then the redelivery


def test_kill9_of_the_worker_a_third_into_the_job_without_hooks(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=20)
    items = make_items(240, prefix="anywhere")
    first = start_worker(redis_server.url, queue="q", **FAST_REDELIVERY)
    job = client.submit(items).status.job_id
    poll(lambda: client.status(job).done >= 80, 120, "a third of the job", interval=0.01)
    first.kill9()
    assert client.status(job).done < 240
    start_worker(redis_server.url, queue="q", **FAST_REDELIVERY)
    check_complete(client, job, items, 20, tiny_classifier)


def test_kill9_of_the_pool_process_requeues_its_chunk_at_once(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
    tmp_path: Path,
) -> None:
    """What the OOM killer does: the pool process dies, the parent lives; no visibility timeout involved."""
    client = job_client(redis_server.url, queue="q", chunk_size=30)
    items, job = make_items(120, prefix="oom"), "oom-kill"
    worker = start_worker(redis_server.url, queue="q", visibility_timeout_s=3600, **hang(job, 2, tmp_path))
    client.submit(items, job_id=job)
    poll(lambda: (tmp_path / f"{job}.2.hang").exists(), 120, "the worker to be inside chunk 2")
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    check_complete(client, job, items, 30, tiny_classifier)
    assert attempts(redis_server, job)[2] == 2
    assert worker.proc.poll() is None  # the same worker went on


def test_sigterm_hands_the_running_chunk_back_after_the_drain_grace(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
    tmp_path: Path,
) -> None:
    """A rolling deploy: SIGTERM mid-chunk; the chunk is requeued at once, not after the visibility timeout"""
    client = job_client(redis_server.url, queue="q", chunk_size=30)
    items, job = make_items(90, prefix="term"), "sigterm"
    slow = {"visibility_timeout_s": 3600, "drain_grace_s": 1}
    first = start_worker(redis_server.url, queue="q", **slow, **hang(job, 1, tmp_path))
    client.submit(items, job_id=job)
    poll(lambda: (tmp_path / f"{job}.1.hang").exists(), 120, "the worker to be inside chunk 1")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) is not None
    assert redis_server.client().llen("q") >= 1  # chunk 1 is back in the queue (chunk 2 may be, too)
    start_worker(redis_server.url, queue="q", **slow)
    check_complete(client, job, items, 30, tiny_classifier)
    assert attempts(redis_server, job)[1] == 2


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_sigterm_lets_a_solo_or_threads_worker_finish_its_chunk_past_the_grace(
    pool: str,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
    tmp_path: Path,
) -> None:
    """These pools cannot cancel a running chunk: SIGTERM is a warm shutdown there. The chunk in hand
    finishes, however long past the grace, on its first attempt; nothing further is taken; exit 0."""
    client = job_client(redis_server.url, queue="q", chunk_size=30)
    items, job = make_items(90, prefix=f"term-{pool}"), f"sigterm-{pool}"
    settings = {"visibility_timeout_s": 3600, "drain_grace_s": 1}
    worker = start_worker(redis_server.url, pool=pool, queue="q", **settings, **hang(job, 1, tmp_path))
    client.submit(items, job_id=job)
    marker = tmp_path / f"{job}.1.hang"
    poll(marker.exists, 120, "the worker to be inside chunk 1")
    worker.proc.send_signal(signal.SIGTERM)
    poll(lambda: "warm shutdown" in worker.text().lower(), 30, "the warm shutdown to begin")
    assert worker.proc.poll() is None  # still finishing chunk 1, past the 1 s grace
    marker.unlink()  # chunk 1 goes on
    assert worker.proc.wait(60) == 0, worker.text()
    assert attempts(redis_server, job) == {0: 1, 1: 1}  # chunk 2 was left in the queue for another worker
    assert client.status(job).done == 60 and not redis_server.client().hgetall(JobKeys(job).errors)
    start_worker(redis_server.url, pool=pool, queue="q", **settings)
    check_complete(client, job, items, 30, tiny_classifier)


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_live_worker_keeps_a_chunk_that_outlasts_the_visibility_timeout(
    pool: str,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
) -> None:
    """A chunk of six slices, each slowed to 0.6 s, on a 2 s visibility timeout, with a second worker idle
    beside it: the first renews its hold on the message before each slice (the delivery tag reaches the
    task in a real worker), so the broker never hands the chunk to the second one while it runs."""
    client = job_client(redis_server.url, queue="q", chunk_size=6)
    items = [{**item, "text": (item["text"] + " ") * 20} for item in make_items(6, prefix=f"hold-{pool}")]
    assert min(len(item["text"]) for item in items) > 125  # one item a slice at a 2 s visibility timeout
    job, warm = f"hold-{pool}", f"warm-{pool}"
    settings = {"visibility_timeout_s": 2, "max_attempts": 20}
    fault = {"test_fault": f"{job}:0:slow,{warm}:*:slow", "test_fault_slow_s": 0.6}
    workers = [start_worker(redis_server.url, pool=pool, queue="q", **settings, **fault) for _ in range(2)]
    # Warm both up first: a cold worker loads its model before its first slice, and that load (seconds on
    # a busy machine) counts against the 2 s timeout. Two slow chunks at once: one for each worker.
    warm_client = job_client(redis_server.url, queue="q", chunk_size=1)
    warm_client.submit(make_items(2, prefix=warm), job_id=warm)
    assert warm_client.wait(warm, timeout=120).state == "done"
    for w in workers:
        poll(lambda w=w: "loaded model" in w.text(), 60, f"the worker's model loaded: {w.log}")
    client.submit(items, job_id=job)
    check_complete(client, job, items, 6, tiny_classifier)
    assert attempts(redis_server, job) == {0: 1}, [w.text() for w in workers]  # never delivered again
    assert sum("6 items in" in w.text() for w in workers) == 1


def test_chunks_that_always_fail_are_dead_lettered_and_the_job_still_finishes(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=10)
    items, job = make_items(50, prefix="dlq"), "poisoned"
    start_worker(redis_server.url, queue="q", max_attempts=3, test_fault=f"{job}:1:exit,{job}:3:raise")
    client.submit(items, job_id=job)
    status = client.wait(job, timeout=180)
    assert (status.state, status.done, status.failed) == ("done", 30, 20)
    lines = list(client.results(job))
    want = expected_lines(tiny_classifier, items, 10)
    assert [line["index"] for line in lines] == list(range(50))
    for index in [*range(0, 10), *range(20, 30), *range(40, 50)]:  # the healthy chunks
        assert_same_line(lines[index], want[index], tiny_classifier.thresholds)
    for line in lines[10:20]:  # the chunk whose process always died
        assert line["scores"] is None and line["id"] == f"dlq-{line['index']}"
        assert line["error"].startswith("gave up after 3 attempts: the worker process died")
    injected = f"injected fault (SAFETY_TEST_FAULT) in chunk 3 of job {job}"
    for line in lines[30:40]:  # the chunk whose classification always raised
        assert line["error"] == f"gave up after 3 attempts: RuntimeError: {injected}"
    assert attempts(redis_server, job) == {0: 1, 1: 4, 2: 1, 3: 3, 4: 1}  # chunk 1: 3 deaths + the give-up
    dead = sorted(json.loads(e)["chunk"] for e in redis_server.client().lrange(DEAD_LETTER, 0, -1))
    assert dead == [1, 3]
    assert "chunk" in status.error and "gave up after 3 attempts" in status.error


def a_healthy_worker_finishes(
    server: RedisServer,
    start_worker: Callable[..., Worker],
    client: JobClient,
    job: str,
    items: list[dict[str, str]],
    clf: Any,
) -> None:
    """After a worker stopped itself: nothing was dead-lettered, and a healthy worker completes every item
    (chunks of 20, queue "q")."""
    assert server.client().llen(DEAD_LETTER) == 0
    start_worker(server.url, queue="q")
    check_complete(client, job, items, 20, clf)


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_worker_that_cannot_load_its_model_hands_chunks_back_uncounted_and_exits(
    pool: str,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
    tmp_path: Path,
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=20)
    items, job = make_items(60, prefix=f"nomodel-{pool}"), f"no-model-{pool}"
    client.submit(items, job_id=job)
    broken = start_worker(redis_server.url, pool=pool, queue="q", model=str(tmp_path / "missing"))
    assert broken.proc.wait(120) == 2  # it stops by itself, with the error code
    log = broken.text()
    assert "cannot load the model" in log and str(tmp_path / "missing") in log
    status = client.status(job)
    assert (status.state, status.done, status.failed) == ("queued", 0, 0)  # no item failed for the worker
    assert attempts(redis_server, job) == {}  # and no delivery counted against a chunk
    a_healthy_worker_finishes(redis_server, start_worker, client, job, items, tiny_classifier)


def test_a_worker_that_stops_itself_never_stops_another_on_the_same_host(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tmp_path: Path,
) -> None:
    """Two workers on one host, neither given -n: the one that cannot load its model asks its node to shut
    down, and with Celery's default name (celery@HOSTNAME, the same for both) the healthy one stopped too.
    (Each on its own queue, so that the broken one surely takes a chunk.)"""
    healthy_client = job_client(redis_server.url, queue="same-host", chunk_size=20)
    broken_client = job_client(redis_server.url, queue="same-host-broken", chunk_size=20)
    healthy = start_worker(redis_server.url, queue="same-host", hostname=None)
    warm_up = healthy_client.submit(make_items(4, prefix="warm")).status.job_id
    assert healthy_client.wait(warm_up, timeout=120).state == "done"  # it is up and consuming
    broken = start_worker(
        redis_server.url, queue="same-host-broken", hostname=None, model=str(tmp_path / "no")
    )
    broken_client.submit(make_items(4, prefix="broken"))
    assert broken.proc.wait(120) == 2  # it took the chunk, could not load its model, and stopped itself
    job = healthy_client.submit(make_items(40, prefix="same-host")).status.job_id
    status = healthy_client.wait(job, timeout=120)  # the healthy one is still there
    assert (status.state, status.done, status.failed) == ("done", 40, 0), healthy.text()[-3000:]
    assert healthy.proc.poll() is None
    names = [re.search(r"safety-\d+@\S+", w.text()) for w in (healthy, broken)]
    assert names[0] and names[1] and names[0].group() != names[1].group()


def test_a_broken_device_stops_the_worker_and_a_healthy_one_finishes_the_job(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=20)
    items, job = make_items(80, prefix="gpu-broke"), "broken-device"
    sick = start_worker(redis_server.url, pool="solo", queue="q", test_fault=f"{job}:1:device")
    client.submit(items, job_id=job)
    assert sick.proc.wait(120) == 2  # it stopped itself instead of failing every chunk it would take next
    assert "the device failed in job broken-device chunk 1" in sick.text()
    assert attempts(redis_server, job)[1] == 1  # the delivery that broke the device counted once
    a_healthy_worker_finishes(redis_server, start_worker, client, job, items, tiny_classifier)


def test_redis_restart_without_persistence_reports_the_job_lost(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tmp_path: Path,
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=20)
    job = "lost-in-restart"
    start_worker(redis_server.url, pool="solo", queue="q", **hang(job, 1, tmp_path))
    client.submit(make_items(100), job_id=job)
    marker = tmp_path / f"{job}.1.hang"
    poll(marker.exists, 120, "the worker to be inside chunk 1")
    outcome: list[BaseException] = []
    waiter = threading.Thread(target=lambda: _capture(outcome, lambda: client.wait(job, poll_s=0.05)))
    waiter.start()
    redis_server.restart()  # no RDB, no AOF: every key is gone
    waiter.join(30)
    assert not waiter.is_alive(), "wait() hung after Redis lost the job"
    assert isinstance(outcome[0], NotFoundError | UnavailableError), outcome
    with pytest.raises(NotFoundError, match="lost when Redis restarted without persistence"):
        client.status(job)
    with pytest.raises(NotFoundError):
        list(client.results(job, timeout=5))

    marker.unlink()  # the worker finishes its chunk: the write must not resurrect the job
    after = client.submit(make_items(30, prefix="after"), job_id="after-restart")
    assert client.wait(after.status.job_id, timeout=120).state == "done"  # the worker reconnected
    assert redis_server.client().keys(f"safety:job:{{{job}}}*") == []


def test_redis_restart_with_persistence_completes_the_job(
    tmp_path: Path,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
) -> None:
    server = RedisServer(tmp_path / "aof", appendonly=True).start()
    try:
        client = job_client(server.url, queue="q", chunk_size=20)
        items, job = make_items(100, prefix="aof"), "durable"
        start_worker(server.url, pool="solo", queue="q", **hang(job, 1, tmp_path))
        client.submit(items, job_id=job)
        marker = tmp_path / f"{job}.1.hang"
        poll(marker.exists, 120, "the worker to be inside chunk 1")
        server.restart()  # kill -9 and start again on the same append-only file
        status = client.status(job)
        assert (status.state, status.done) == ("running", 20)
        marker.unlink()
        check_complete(client, job, items, 20, tiny_classifier)
    finally:
        server.kill()


def test_submit_wait_rides_out_a_redis_restart_and_writes_the_completed_jobs_results(
    tmp_path: Path, start_worker: Callable[..., Worker], tiny_classifier: Any
) -> None:
    """`safety submit --wait` stopped at a one-second Redis restart with exit 2 ("Redis at … is
    unreachable"), although the job survived the restart (persistence) and completed."""
    server = RedisServer(tmp_path / "aof", appendonly=True).start()
    items, job = make_items(60, prefix="blip"), "blip"
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "submit.err"
    src.write_text("".join(json.dumps(item) + "\n" for item in items))
    submit = None
    try:
        start_worker(server.url, pool="solo", queue="q", **hang(job, 1, tmp_path))
        env = worker_env(server.url, tmp_path, queue="q", chunk_size=20)
        argv = [sys.executable, "-m", "worker.cli", "submit", str(src), "--job-id", job, "--wait",
                "--no-progress", "--out", str(out)]  # fmt: skip
        with open(err, "wb") as stderr:
            submit = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        marker = tmp_path / f"{job}.1.hang"
        poll(marker.exists, 120, "the worker to be inside chunk 1")
        poll(lambda: "submitted job blip" in err.read_text(), 30, "the submit to wait for its job")
        server.kill()
        poll(lambda: "retrying for up to 60s" in err.read_text(), 30, "the submit to notice the outage")
        server.start()  # the same append-only file: the job is back
        marker.unlink()
        assert submit.wait(180) == 0, err.read_text()
        said = err.read_text()
        assert "Redis answers again" in said and "job blip done: 60 done, 0 failed; 60 lines" in said, said
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert_job_output(lines, expected_lines(tiny_classifier, items, 20), tiny_classifier.thresholds)
    finally:
        if submit is not None and submit.poll() is None:
            submit.kill()
            submit.wait(10)
        server.kill()


def _capture(out: list[BaseException], fn: Callable[[], Any]) -> None:
    try:
        fn()
    except BaseException as e:
        out.append(e)
