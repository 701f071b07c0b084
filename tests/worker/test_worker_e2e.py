"""Jobs end to end: real Redis, real `celery worker` subprocesses, the `safety` command line."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from model.errors import NotFoundError
from tests.worker.harness import (
    RedisServer,
    Worker,
    assert_job_output,
    expected_lines,
    free_port,
    make_items,
    poll,
    worker_env,
)
from worker.app import send_chunk
from worker.jobs import JobClient
from worker.store import JobKeys

SAFETY = str(Path(sys.executable).parent / "safety")
QUEUE = "e2e"


@pytest.fixture(scope="module")
def worker(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Worker]:
    """One prefork worker (concurrency 1) on queue `e2e` for the whole module."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    w = Worker(worker_env(module_redis.url, tiny_model_dir, queue=QUEUE), log, pool="prefork")
    yield w
    w.stop()


def test_2000_items_each_exactly_once_equal_to_classify(
    module_redis: RedisServer, worker: Worker, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    client = job_client(module_redis.url, queue=QUEUE, chunk_size=256)
    items = make_items(2000)
    job = client.submit(items).status.job_id
    status = client.wait(job, timeout=240)
    assert (status.state, status.done, status.failed, status.chunks) == ("done", 2000, 0, 8)
    assert (
        status.model == tiny_classifier.name and status.finished_at >= status.started_at >= status.created_at
    )
    want = expected_lines(tiny_classifier, items, 256)  # after the job: two torch processes would fight
    assert_job_output(list(client.results(job, timeout=30)), want, tiny_classifier.thresholds)
    attempts = module_redis.client().hgetall(JobKeys(job).attempts)
    assert attempts == {str(c): "1" for c in range(8)}
    # The model was loaded once, by the pool process, never by the parent (MainProcess).
    loads = re.findall(r"INFO/(\S+?)\] loaded model", worker.text())
    assert loads == ["ForkPoolWorker-1"], worker.text()[-3000:]


def run(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run([SAFETY, *args], env=env, capture_output=True, text=True, timeout=240, **kw)


def test_cli_submit_wait_then_status_results_cancel(
    module_redis: RedisServer, worker: Worker, tmp_path: Path, tiny_model_dir: Path, tiny_classifier: Any
) -> None:
    env = worker_env(module_redis.url, tiny_model_dir, queue=QUEUE, chunk_size=8)
    items = make_items(30, prefix="cli")
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(json.dumps(it) for it in items[:10]) + "\n\n" + "\n".join(map(json.dumps, items[10:]))
    )
    out = tmp_path / "out.jsonl"
    done = run(["submit", str(src), "--out", str(out), "--wait", "--job-id", "cli-job"], env)
    assert done.returncode == 0, done.stderr
    assert "job cli-job done: 30 done, 0 failed; 30 lines" in done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert_job_output(lines, expected_lines(tiny_classifier, items, 8), tiny_classifier.thresholds)

    status = run(["job", "status", "cli-job"], env)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "done"
    results = run(["job", "results", "cli-job"], env)
    assert results.returncode == 0 and [json.loads(x) for x in results.stdout.splitlines()] == lines
    cancel = run(["job", "cancel", "cli-job"], env)
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["state"] == "done"  # too late to cancel
    missing = run(["job", "status", "no-such-job"], env)
    assert missing.returncode == 2 and "not found" in missing.stderr
    nowhere = tmp_path / "no-such-dir" / "out.jsonl"
    unwritable = run(["job", "results", "cli-job", "--out", str(nowhere)], env)
    assert unwritable.returncode == 2 and f"--out: cannot write {nowhere}: " in unwritable.stderr
    r = module_redis.client()
    before = r.llen(QUEUE)
    refused = run(["submit", str(src), "--wait", "--out", str(nowhere), "--job-id", "never"], env)
    assert refused.returncode == 2 and "no-such-dir does not exist; create it first" in refused.stderr
    assert not r.exists(JobKeys("never").job) and r.llen(QUEUE) == before


def test_cli_refuses_a_bad_line_before_queueing(
    module_redis: RedisServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = worker_env(module_redis.url, tiny_model_dir, queue="refused")
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n\n{"text": "x", "role": "narrator"}\n')
    bad = run(["submit", str(src), "--job-id", "refused"], env)
    assert bad.returncode == 2
    assert f"safety submit: {src} line 3: items[1].role: must be one of" in bad.stderr
    src.write_text('{"text": "fine"}\n{"text": \n')
    broken = run(["submit", str(src), "--job-id", "refused"], env)
    assert broken.returncode == 2 and f"safety submit: {src} line 2: not valid JSON (" in broken.stderr
    r = module_redis.client()
    assert r.llen("refused") == 0 and not r.exists(JobKeys("refused").job)


def test_cli_refuses_a_directory_for_out_before_queueing(
    module_redis: RedisServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """It used to run the whole job, then fail on the rename with an IsADirectoryError traceback (exit 1)."""
    env = worker_env(module_redis.url, tiny_model_dir, queue="out-dir")
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n')
    refused = run(["submit", str(src), "--wait", "--out", str(tmp_path), "--job-id", "out-dir"], env)
    assert refused.returncode == 2, refused.stderr
    said = f"safety submit: --out: cannot write {tmp_path}: it is a directory; name a file\n"
    assert refused.stderr == said
    r = module_redis.client()
    assert r.llen("out-dir") == 0 and not r.exists(JobKeys("out-dir").job)


def test_interrupted_submit_resumes_with_the_same_job_id(
    module_redis: RedisServer,
    tmp_path: Path,
    tiny_model_dir: Path,
    start_worker: Callable[..., Worker],
    tiny_classifier: Any,
) -> None:
    env = worker_env(module_redis.url, tiny_model_dir, queue="later", chunk_size=10)
    items = make_items(35, prefix="r")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in items))
    cmd = ["submit", str(src), "--wait", "--job-id", "resume-me", "--out", str(out)]
    proc = subprocess.Popen([SAFETY, *cmd], env=env, stderr=subprocess.PIPE, text=True)
    r = module_redis.client()
    poll(lambda: r.hget(JobKeys("resume-me").job, "state") == "queued", 60, "the job to be queued")
    proc.send_signal(signal.SIGINT)  # no worker consumes `later` yet: the CLI is waiting
    assert proc.wait(30) == 130
    assert "Resume with: safety submit" in proc.stderr.read()
    assert not out.exists()

    again = run(["submit", str(src), "--job-id", "resume-me"], env)
    assert again.returncode == 0 and "resumed job resume-me: 35 items, 0 chunks sent" in again.stderr
    assert r.llen("later") == 4  # each chunk queued once

    start_worker(module_redis.url, queue="later")
    finished = run(cmd, env)
    assert finished.returncode == 0, finished.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert_job_output(lines, expected_lines(tiny_classifier, items, 10), tiny_classifier.thresholds)


def test_a_submit_interrupted_while_queueing_names_the_job_it_made(
    module_redis: RedisServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Without --job-id, the id is chosen before anything is sent: Ctrl-C in the middle says how to resume."""
    env = worker_env(module_redis.url, tiny_model_dir, queue="interrupted", chunk_size=1)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in make_items(3000, prefix="i")))
    r = module_redis.client()
    known = set(r.scan_iter("safety:job:{*}"))  # job records only (the other keys of a job have suffixes)
    proc = subprocess.Popen([SAFETY, "submit", str(src)], env=env, stderr=subprocess.PIPE, text=True)

    def queueing() -> bool:
        return any(r.hget(k, "state") == "submitting" for k in set(r.scan_iter("safety:job:{*}")) - known)

    poll(queueing, 60, "the job to be queueing its 3,000 chunks", interval=0.005)
    proc.send_signal(signal.SIGINT)
    code, said = proc.wait(30), proc.stderr.read()
    assert code == 130, said
    hint = re.search(r"interrupted; job (\w+) goes on\. Resume with: safety submit \S+ --job-id (\w+)", said)
    assert hint is not None and hint[1] == hint[2]
    assert r.hget(JobKeys(hint[1]).job, "state") == "submitting"
    again = run(["submit", str(src), "--job-id", hint[1]], env)
    assert again.returncode == 0 and f"resumed job {hint[1]}: 3000 items" in again.stderr, again.stderr
    # each chunk queued once, but for one the interrupt may have caught between publish and mark (a harmless
    # second delivery: the first result written per item wins)
    assert 3000 <= r.llen("interrupted") <= 3001


def test_results_expire_after_the_ttl(
    module_redis: RedisServer, worker: Worker, job_client: Callable[..., JobClient]
) -> None:
    client = job_client(module_redis.url, queue=QUEUE, result_ttl_s=3)
    job = client.submit(make_items(5)).status.job_id
    assert client.wait(job, timeout=120).state == "done"
    assert all(0 < ttl <= 3 for ttl in client.store.ttls(job).values())
    assert len(list(client.results(job))) == 5

    def expired() -> bool:
        try:
            client.status(job)
        except NotFoundError:
            return True
        return False

    poll(expired, 10, "the job to expire", interval=0.2)
    assert module_redis.client().keys(f"safety:job:{{{job}}}*") == []
    with pytest.raises(NotFoundError, match="expired"):
        list(client.results(job))


@pytest.mark.parametrize("pool", ["solo", "prefork"])  # prefork: the pool processes log too
def test_json_logs_are_one_object_per_line_with_the_task_id(
    module_redis: RedisServer,
    start_worker: Callable[..., Worker],
    job_client: Callable[..., JobClient],
    pool: str,
) -> None:
    """SAFETY_LOG_FORMAT=json (what the Kubernetes config sets): no banner, no Celery text line, and the
    metrics exporter's address a record too (it is on in Kubernetes); a record logged inside a chunk
    carries the chunk's task id."""
    port = free_port()
    w = start_worker(
        module_redis.url, pool=pool, queue=f"json-logs-{pool}", log_format="json", worker_metrics_port=port
    )
    client = job_client(module_redis.url, queue=f"json-logs-{pool}", chunk_size=8)
    job = client.submit(make_items(8)).status.job_id
    assert client.wait(job, timeout=120).state == "done"
    poll(lambda: "loaded model" in w.text(), timeout=10, what="the model's load record")
    w.stop()
    lines = [line for line in w.text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line: raises on the first that is not JSON
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any("ready" in r["msg"] for r in records), "Celery's own records go through the same formatter"
    [address] = [r for r in records if r.get("metrics_port") == port]
    assert address["msg"] == f"Prometheus metrics on :{port}/metrics" and address["logger"] == "safety.worker"
    in_task = [r for r in records if r.get("task_id") == f"{job}.0"]
    assert in_task and all(r["task_name"] == "worker.tasks.classify_chunk" for r in in_task)


@pytest.mark.parametrize(
    ("pool", "how"), [("solo", "Warm"), ("prefork", "Cold")]
)  # prefork: `safety worker` remaps SIGTERM to Celery's cold shutdown (hand the chunk back after the grace)
def test_json_logs_stay_json_through_a_sigterm_shutdown(
    module_redis: RedisServer, tmp_path: Path, tiny_model_dir: Path, pool: str, how: str
) -> None:
    """Celery prints its shutdown notices (`worker: Warm shutdown (MainProcess)`, `worker: Hitting Ctrl+C
    again will terminate all running tasks!`) with os.write, past logging: with SAFETY_LOG_FORMAT=json they
    must be JSON records like every other line, on stdout and stderr alike."""
    env = worker_env(module_redis.url, tiny_model_dir, queue=f"json-stop-{pool}", log_format="json")
    w = Worker(env, tmp_path / "worker.log", pool=pool)
    try:
        poll(lambda: "ready" in w.text(), timeout=60, what=f"the worker ready: {w.log}")
        w.proc.send_signal(signal.SIGTERM)
        w.proc.wait(60)
    finally:
        w.stop()
    lines = [line for line in w.text().splitlines() if line.strip()]
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{w.text()}")
    msgs = [json.loads(line)["msg"] for line in lines]
    assert f"worker: {how} shutdown (MainProcess)" in msgs, msgs


def submit_as_previous_release(
    client: JobClient, items: list[dict[str, str]], job_id: str, chunks: int
) -> None:
    """What the previous release's JobClient did for a job's first `chunks` chunks before its submit was
    interrupted: a record without a nonce, the items stored, messages of two args `[job_id, chunk]`."""
    s, prepared, now = client.settings, client.prepare(items), time.time()
    record = {
        "state": "submitting", "total": len(items), "done": 0, "failed": 0, "chunk_size": s.chunk_size,
        "chunks": math.ceil(len(items) / s.chunk_size), "ttl_s": s.result_ttl_s, "created": repr(now),
        "updated": repr(now), "digest": prepared.digest, "queue": s.queue,
    }  # fmt: skip
    assert client.store.create(job_id, record) is None
    client.store.mark_active(job_id)
    for chunk, lines in zip(range(chunks), prepared.payloads(s.chunk_size), strict=False):
        first = chunk * s.chunk_size
        assert client.store.upload(job_id, first, lines)
        send_chunk(client.app, job_id, chunk, s.queue)
        assert client.store.mark_enqueued(job_id, chunk)


def test_a_job_and_messages_of_the_previous_release_still_run(
    module_redis: RedisServer, worker: Worker, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """A rolling upgrade: the previous release created the job (a record without a nonce) and sent its first
    chunks as `[job_id, chunk]`. The new worker classifies them, and the new client resumes the job and
    sends the rest without a nonce as well (with a nonce the record does not have, the worker would take
    them for another job's and skip them: the job would never finish)."""
    client = job_client(module_redis.url, queue=QUEUE, chunk_size=4)
    items = make_items(12, prefix="prev")
    submit_as_previous_release(client, items, "prev-release", chunks=2)
    poll(lambda: client.status("prev-release").completed == 8, 120, "the previous release's two chunks")
    resumed = client.submit(items, job_id="prev-release")
    assert (resumed.resumed, resumed.sent) == (True, 1)
    status = client.wait("prev-release", timeout=120)
    assert (status.state, status.done, status.failed) == ("done", 12, 0)
    lines = list(client.results("prev-release", timeout=30))
    assert_job_output(lines, expected_lines(tiny_classifier, items, 4), tiny_classifier.thresholds)
    assert module_redis.client().hget(JobKeys("prev-release").job, "nonce") is None


def held(r: Any, task_id: str) -> bool:
    """Whether a message of this task id is still queued or delivered and not acknowledged (kombu's Redis
    transport keeps a delivered message in the `unacked` hash until its ack; other tests' leftovers may be
    there too, so only this one counts)."""
    for raw in [*r.lrange(QUEUE, 0, -1), *r.hvals("unacked")]:
        message = json.loads(raw)
        message = message[0] if isinstance(message, list) else message  # unacked: [message, exchange, key]
        if message.get("headers", {}).get("id") == task_id:
            return True
    return False


def test_a_worker_acknowledges_and_skips_a_message_of_another_job_of_the_id(
    module_redis: RedisServer, worker: Worker, job_client: Callable[..., JobClient]
) -> None:
    client = job_client(module_redis.url, queue=QUEUE, chunk_size=4)
    client.submit(make_items(8), job_id="other-gen")
    assert client.wait("other-gen", timeout=120).state == "done"
    r, keys = module_redis.client(), JobKeys("other-gen")
    record = r.hgetall(keys.job)
    send_chunk(client.app, "other-gen", 1, QUEUE, nonce="0" * 32)  # an earlier job's message, say
    said = "job other-gen chunk 1: the message belongs to an earlier job of this id"
    poll(lambda: said in worker.text(), 60, "the worker to skip the message")
    poll(lambda: not held(r, "other-gen.1"), 30, f"the message to be acknowledged ({r.hgetall('unacked')})")
    assert r.hgetall(keys.attempts) == {"0": "1", "1": "1"} and r.hgetall(keys.job) == record
