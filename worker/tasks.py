"""The chunk task: classify one chunk of a job and write one result per item, exactly once.

Owns: what a delivery of a chunk does. It counts the attempt in Redis first, so a chunk whose worker keeps
dying (requeued by `task_reject_on_worker_lost` or redelivered after the visibility timeout) is dead-lettered
after `max_attempts` deliveries with its items marked failed, instead of looping forever. Items that already
have a result are skipped, so a redelivered chunk redoes only what is missing. The rest is classified and
stored a slice at a time (`worker.slices`, sized from the model's rate measured at load and each slice's), the
job's state read and the hold on the message renewed (compare-and-set, on the app's broker) before each slice:
a live worker keeps a chunk longer than the visibility timeout, a killed one loses only the slice in hand, and
one whose hold went to another delivery stops. Any error other than a bad item hands the message back to the
queue (`Reject(requeue=True)`) rather than acknowledging a chunk whose results were never written; one that
Redis cut off (the connection dropped or timed out) has its attempt uncounted once Redis answers again. The
classifier is loaded once per worker process, lazily on its first chunk (never in the prefork parent, so CUDA
is initialised only after fork) and before that delivery counts as an attempt: a worker that cannot load its
model hands the chunk back uncounted and shuts down; one whose device breaks for good (a sticky CUDA error)
hands the chunk back (that attempt counted) and shuts down too. Each delivery's outcome (done, retried,
dead_lettered, skipped: also a chunk whose job was cancelled or went away while it ran, whose results are
discarded; lost_hold: it stopped, its message taken by another delivery), its wall time and the items it wrote
are counted in `worker.metrics`. A message carries its job's nonce (`worker.store`): one that belongs to
another job of the same id (an earlier job, deleted or expired, whose id was submitted again) is `stale` and
skipped: nothing counted, nothing written, acknowledged. A message of the previous release has no nonce (two
args) and runs unchecked, as it did. Must not know: the job client's submission path, gRPC, how metrics are
exported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import time
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Reject

from model.errors import InvalidInputError, device_failed
from model.items import item_id
from worker import faults
from worker.app import TASK_NAME, app
from worker.metrics import Metrics, process_metrics
from worker.settings import WorkerSettings
from worker.slices import (
    LOST,
    UNACKED_INDEX,
    Hold,
    assumed_tokens_per_s,
    broker_redis_url,
    item_chars,
    largest_item_s,
    slice_chars,
    slices,
    unacked_index_key,
)
from worker.store import FINISHED, JobStore, Written, failed_line, result_line

if TYPE_CHECKING:
    from model import Classifier

log = logging.getLogger(__name__)
# Why a chunk was given up when no delivery of it recorded an error of its own.
WORKER_LOST = (
    "the worker process died or was stopped while classifying it (a crash, an OOM kill or kill -9, a "
    "shutdown past its drain grace), or its deliveries were cut off (Redis unreachable for longer than the "
    "worker waited, a slice past the visibility timeout)"
)
# A delivery that Redis cut off mid-chunk (the connection dropped or timed out) is not the chunk's fault: the
# worker waits up to this long (and a quarter of the visibility timeout at most, so that the broker does not
# hand the message on meanwhile) for Redis to answer again, to uncount that delivery's attempt.
GIVE_BACK_WAIT_S = 30.0
# other actions: skipped
CHUNK_OUTCOMES = {"classified": "done", "dead-lettered": "dead_lettered", "lost_hold": "lost_hold"}
# A write's outcome that discards the chunk's results: the job was cancelled, is gone, or is another job of
# the same id (`stale`: the message's nonce is not the record's).
DISCARDED = {
    "cancelled": "cancelled",
    "gone": "deleted, expired or lost",
    "stale": "replaced by another job of its id",
}
# Set by a process that stops the worker (no model, a broken device); shared memory made before the prefork
# pool forks (the app imports this module in the parent), so the parent sees a child's failure.
WORKER_FAILED = multiprocessing.RawValue("b", 0)
# Tokens in the sequence the worker times once its model is loaded (`measure_tokens_per_s`): long enough to
# be a real window on a CPU, short enough to cost a few seconds for a base-size checkpoint (~180 tokens/s).
PROBE_TOKENS = 2048


class ClassifierTask(Task):
    """Base of the chunk task. Celery makes one instance per process: it holds the classifier and Redis."""

    @cached_property
    def settings(self) -> WorkerSettings:
        return WorkerSettings.from_env()

    @cached_property
    def store(self) -> JobStore:
        return JobStore.for_worker(self.settings.redis_url)

    @cached_property
    def metrics(self) -> Metrics:
        return process_metrics()

    # The loaded model's measured rate on its device (None until loaded, or when the probe failed): slices
    # are sized for it (`worker.slices.slice_chars`) when it is under the device's floor rate.
    tokens_per_s: float | None = None

    @cached_property
    def classifier(self) -> Classifier:
        # Imported here: torch loads in the worker process, never in the prefork parent.
        import torch

        started = time.perf_counter()
        clf = self.settings.load()
        if clf.runner.compiled:
            clf.warmup()  # every bucket shape compiles now, not inside the first chunks
        self.tokens_per_s = measure_tokens_per_s(clf)
        log.info(
            "loaded model %s (revision %s) on %s (%s, %s attention, %s, CUDA graphs %s, fused GEMMs %s, "
            "%d CPU threads) in %.1fs; %s tokens/s measured, slices sized for %.0f",
            clf.name, clf.revision, clf.device, clf.dtype, clf.backend,
            "compiled" if clf.runner.compiled else "eager",
            clf.graphs_text, "on" if clf.runner.fused_gemm else "off", torch.get_num_threads(),
            time.perf_counter() - started, f"{self.tokens_per_s:,.0f}" if self.tokens_per_s else "no",
            assumed_tokens_per_s(clf.device, self.tokens_per_s),
        )  # fmt: skip
        if warning := visibility_warning(self.settings, clf.device, self.tokens_per_s):
            log.warning("%s", warning)
        return clf


def measure_tokens_per_s(clf: Classifier) -> float | None:
    """The loaded model's tokens per second on its device: one sequence of PROBE_TOKENS (or the model's
    longest) timed after a short one that takes first-call costs off the clock. None (logged) if it fails:
    slices are then sized for the device's floor rate alone."""
    try:
        top = max(2, min(PROBE_TOKENS, clf.limits.max_tokens))
        clf.forward([clf.filler(min(top, 16))])
        began = time.perf_counter()
        clf.forward([clf.filler(top)])  # logits come back to the CPU: the time is the device's
        return top / max(time.perf_counter() - began, 1e-9)
    except Exception:
        log.warning("could not measure the model's rate; slices are sized for the floor rate", exc_info=True)
        return None


def visibility_warning(
    settings: WorkerSettings, device: str, tokens_per_s: float | None = None
) -> str | None:
    """What is wrong, if the largest item allowed could outlast the visibility timeout at the rate slices are
    sized for (`worker.slices.assumed_tokens_per_s`: the device's floor, or the measured `tokens_per_s` over
    its safety factor if lower): one item is never split, so the broker would hand its chunk to another
    worker while it still runs."""
    largest = largest_item_s(settings.max_text_chars, device, tokens_per_s)
    rate = assumed_tokens_per_s(device, tokens_per_s)
    vt = settings.visibility_timeout_s
    if largest <= vt:
        return None
    return (
        f"SAFETY_VISIBILITY_TIMEOUT_S={vt} is below the {largest:.0f}s that one item of "
        f"SAFETY_MAX_TEXT_CHARS={settings.max_text_chars} characters (and as long a context) may take on "
        f"{device} at {rate:,.0f} tokens/s: its chunk would be delivered "
        "again while it runs; raise the timeout or lower SAFETY_MAX_TEXT_CHARS"
    )


@app.task(bind=True, base=ClassifierTask, name=TASK_NAME)
def classify_chunk(self: ClassifierTask, job_id: str, chunk: int, nonce: str | None = None) -> dict[str, Any]:
    """args `[job_id, chunk, nonce]`; `[job_id, chunk]` from the previous release, or for a job it created."""
    return deliver(self, job_id, chunk, nonce)


def deliver(task: ClassifierTask, job_id: str, chunk: int, nonce: str | None = None) -> dict[str, Any]:
    """One delivery of a chunk: run it, count its outcome in `task.metrics`, and hand the message back to the
    queue on any error that left results unwritten. `nonce`: the job's, from the message (None: unchecked)."""
    began, received = time.perf_counter(), time.time()
    try:
        task.classifier  # noqa: B018 -- loaded before the delivery counts as an attempt
    except Exception as e:
        model_unavailable(task, job_id, chunk, e, began)
    tally = Tally()  # the items this delivery wrote, slice by slice, whatever its outcome
    try:
        done = run_chunk(task, job_id, chunk, nonce, tally, received)
    except Reject:
        _count(task, "retried", began, tally.ok, tally.failed)
        raise
    except Exception as e:  # Redis unreachable, or a bug: never ack a chunk whose results are unwritten
        log.exception("job %s chunk %d: requeued after an unexpected error", job_id, chunk)
        error = f"{type(e).__name__}: {e}"
        if not isinstance(e, redis.RedisError):  # a Redis blip is not the chunk's fault: keep its last error
            with contextlib.suppress(Exception):  # so a later give-up names the cause (if Redis is reachable)
                task.store.record_error(job_id, chunk, error, nonce=nonce)
        elif tally.counted and isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
            give_back(task, job_id, chunk, nonce)  # nor does it cost the chunk one of its attempts
        _count(task, "retried", began, tally.ok, tally.failed)
        raise Reject(error, requeue=True) from e
    outcome = CHUNK_OUTCOMES.get(done["action"], "skipped")
    _count(task, outcome, began, tally.ok, tally.failed)
    return done


def give_back(task: ClassifierTask, job_id: str, chunk: int, nonce: str | None) -> None:
    """Uncount the attempt of a delivery that Redis cut off, once Redis answers again: tried at once, then
    once a second, for GIVE_BACK_WAIT_S (a quarter of the visibility timeout at most); after that the attempt
    stays counted (a give-up then says the deliveries were cut off)."""
    wait = min(GIVE_BACK_WAIT_S, task.settings.visibility_timeout_s / 4)
    until = time.monotonic() + wait
    while True:
        try:
            if task.store.give_back_attempt(job_id, chunk, nonce):
                log.info(
                    "job %s chunk %d: Redis cut the delivery off; its attempt is not counted", job_id, chunk
                )
            return
        except redis.RedisError:
            if time.monotonic() + 1.0 > until:
                log.warning("job %s chunk %d: Redis did not answer within %.0f s; the attempt stays counted",
                            job_id, chunk, wait)  # fmt: skip
                return
            time.sleep(1.0)


@dataclass
class Tally:
    """Items newly written by one delivery: its slices' results, or the failed lines of its give-up; and
    whether it counted an attempt (`start_chunk` said run)."""

    ok: int = 0
    failed: int = 0
    counted: bool = False

    def add(self, written: Written) -> None:
        self.ok += written.ok
        self.failed += written.failed


def model_unavailable(
    task: ClassifierTask, job_id: str, chunk: int, error: Exception, began: float
) -> NoReturn:
    """This process cannot load its model (a wrong SAFETY_MODEL, a device it cannot use): that is the
    worker's fault, not the chunk's. No attempt is counted and no item fails; the chunk goes back to the
    queue for a healthy worker, and this worker shuts down."""
    reason = f"cannot load the model: {type(error).__name__}: {error}"
    stop_worker(task, f"{reason}; job {job_id} chunk {chunk} goes back to the queue")
    _count(task, "retried", began)
    raise Reject(reason, requeue=True) from error


def stop_worker(task: ClassifierTask, reason: str) -> None:
    """This process cannot classify any more (no model, or a device broken for good): ask this worker to shut
    down (a remote-control shutdown, so it reaches the prefork parent too); `safety worker` then exits with
    2, and an orchestrator shows the failure instead of a worker that takes chunks and fails them all."""
    log.critical("%s; this worker shuts down", reason)
    WORKER_FAILED.value = 1
    try:
        task.app.control.shutdown(destination=[task.request.hostname])
    except Exception:  # the broker is unreachable too: the delivery is still handed back
        log.exception("could not ask this worker to shut down")


def worker_failed() -> bool:
    """True once a process of this worker (the main one, or a prefork child) stopped it for a failure."""
    return bool(WORKER_FAILED.value)


def _count(task: ClassifierTask, outcome: str, began: float, ok: int = 0, failed: int = 0) -> None:
    try:
        task.metrics.chunk(outcome, time.perf_counter() - began, ok, failed)
    except Exception:  # e.g. a full disk under PROMETHEUS_MULTIPROC_DIR: metrics never cost a chunk
        log.warning("could not count a chunk delivery (%s) in the metrics", outcome, exc_info=True)


def run_chunk(
    task: ClassifierTask,
    job_id: str,
    chunk: int,
    nonce: str | None = None,
    tally: Tally | None = None,
    received: float | None = None,
) -> dict[str, Any]:
    """One delivery's work: start the chunk, then classify and store its missing items a slice at a time
    (`worker.slices`), checking the job and renewing the hold on its message before each slice. `tally`
    counts what it wrote; `received`: when this delivery started (epoch seconds; default now), which kombu's
    stamp of this delivery's message precedes."""
    received = time.time() if received is None else received
    tally = Tally() if tally is None else tally
    store, max_attempts = task.store, task.settings.max_attempts
    start = store.start_chunk(job_id, chunk, nonce)
    if start.action == "stale":
        log.info("job %s chunk %d: the message belongs to an earlier job of this id (deleted or expired, the "
                 "id submitted again); skipped", job_id, chunk)  # fmt: skip
        return {"job_id": job_id, "chunk": chunk, "action": "stale"}
    if start.action != "run":  # complete (a redelivery after the write), cancelled, or gone (expired or lost)
        log.info("job %s chunk %d: %s, nothing to do", job_id, chunk, start.action)
        return {"job_id": job_id, "chunk": chunk, "action": start.action}
    tally.counted = True
    indices = [
        i
        for i, r in zip(range(start.lo, start.hi), store.results(job_id, start.lo, start.hi), strict=True)
        if r is None
    ]
    items = store.items(job_id, indices)
    if any(item is None for item in items):
        record = store.get(job_id)
        if record is None or record.get("state") in FINISHED:  # finished or expired between the two reads
            return {"job_id": job_id, "chunk": chunk, "action": "gone"}
        # the job is open but its items are not there (evicted, or lost with a Redis restart): no attempt
        # brings them back; fail them now with the reason, rather than redeliver the chunk for ever
        error = "its items are missing from Redis (evicted, or lost in a restart); submit the job again"
        found = [item or {} for item in items]
        return give_up(store, job_id, chunk, start.attempt, indices, found, error, nonce, tally)
    if start.attempt > max_attempts:
        error = f"gave up after {max_attempts} attempts: {start.last_error or WORKER_LOST}"
        return give_up(store, job_id, chunk, start.attempt - 1, indices, items, error, nonce, tally)

    def fail(e: Exception) -> dict[str, Any]:
        """The chunk failed (the slices it stored stay stored): requeue it, or give up on its last attempt."""
        error = f"{type(e).__name__}: {e}"
        if device_failed(e):  # every later chunk would fail here too: this process is done, the chunk is not
            stop_worker(task, f"the device failed in job {job_id} chunk {chunk}: {error}")
        store.record_error(job_id, chunk, error, nonce=nonce)  # a give-up on a later delivery names it
        if start.attempt >= max_attempts:
            error = f"gave up after {max_attempts} attempts: {error}"
            return give_up(store, job_id, chunk, start.attempt, indices, items, error, nonce, tally)
        log.warning("job %s chunk %d attempt %d failed, requeued: %s", job_id, chunk, start.attempt, error)
        raise Reject(error, requeue=True) from e

    began = time.perf_counter()
    hold = delivery_hold(task, received)
    clf = task.classifier  # loaded by `deliver`
    vt, device = task.settings.visibility_timeout_s, getattr(clf, "device", "cpu")
    measured, observed = getattr(task, "tokens_per_s", None), {"chars_per_s": None}
    # each slice sized when it starts: from the load-time measurement, then also the slice before's rate
    bound = lambda: slice_chars(vt, device, measured, observed["chars_per_s"])  # noqa: E731
    parts = slices(list(zip(indices, items, strict=True)), lambda p: item_chars(p[1]), bound)
    written, count = None, 0
    for part in parts:
        # the job first (one read): a cancelled, deleted or replaced job stops the chunk before a slice more
        state = store.chunk_state(job_id, nonce)
        if state in DISCARDED:
            return discarded(job_id, chunk, state, tally)
        # then the hold: the model load, or the slice before, took time off it
        if hold.renew() == LOST:
            return lost_hold(job_id, chunk, hold, tally)
        count += 1
        slice_began = time.perf_counter()
        try:
            faults.inject(job_id, chunk)
            lines = classify_lines(clf, [i for i, _ in part], [item for _, item in part])
        except Exception as e:
            return fail(e)
        seconds = time.perf_counter() - slice_began
        if seconds > 0:
            observed["chars_per_s"] = sum(item_chars(item) for _, item in part) / seconds
        payload = [(i, json.dumps(line), failed) for i, line, failed in lines]
        written = store.write(job_id, payload, model=clf.name, nonce=nonce)
        if written.state in DISCARDED:  # cancelled, deleted, lost or replaced while it ran: no more written
            return discarded(job_id, chunk, written.state, tally)
        tally.add(written)
    if written is None:  # another delivery stored every missing result since this one started: nothing left
        written = store.write(job_id, [], model=clf.name, nonce=nonce)
    log.info(
        "job %s chunk %d: %d items in %.2fs%s (attempt %d), job %s",
        job_id, chunk, len(indices), time.perf_counter() - began,
        f", {count} slices" if count > 1 else "", start.attempt, written.state,
    )  # fmt: skip
    return {
        "job_id": job_id,
        "chunk": chunk,
        "action": "classified",
        "written": tally.ok + tally.failed,
        "ok": tally.ok,
        "failed": tally.failed,
    }


def discarded(job_id: str, chunk: int, state: str, tally: Tally) -> dict[str, Any]:
    """The job was cancelled, deleted, lost or replaced while the chunk ran: nothing more is written (the
    slices stored before stay)."""
    later = " from then on" if tally.ok + tally.failed else ""
    log.info("job %s chunk %d: the job was %s meanwhile; its results are discarded%s", job_id, chunk,
             DISCARDED[state], later)  # fmt: skip
    return {"job_id": job_id, "chunk": chunk, "action": state}


def lost_hold(job_id: str, chunk: int, hold: Hold, tally: Tally) -> dict[str, Any]:
    """The message is not this delivery's any more: the broker handed it back and (most likely) another
    worker took it, keeping its delivery tag, while this one ran a slice longer than the visibility timeout.
    Stop: the slices stored stay, the rest is the new holder's (it skips what is stored).

    The delivery then returns, and Celery acknowledges the message (acks_late) as kombu does any ack: ZREM
    and HDEL of the tag in `unacked_index`/`unacked`, which are now the new holder's entries. No option
    spares them: `Reject(requeue=False)` removes the same two entries (kombu's QoS.reject ->
    `_remove_from_indices`); `Reject(requeue=True)` (QoS.restore_by_tag) removes them too and puts the
    message back on the queue, so a third delivery would run beside the new holder; never acknowledging it
    leaves the message in this worker's prefetch window (it takes nothing else) and kombu's restore at
    shutdown would re-queue it the same way. Acknowledging does the least harm: the new holder runs on and
    its own ack is a no-op; only if it then dies is its message gone from `unacked`, so no visibility
    timeout brings it back, and the lost-chunk sweeper (`worker.reclaim`) re-sends the chunk once the job has
    stalled for its `stall_s`, with the stored results kept and the attempt counted as usual."""
    log.warning(
        "job %s chunk %d: lost the hold on message %s (a slice outlasted the visibility timeout and the "
        "broker handed the chunk to another delivery); stopping, %d results stored by this delivery kept",
        job_id, chunk, hold.tag, tally.ok + tally.failed,
    )  # fmt: skip
    return {"job_id": job_id, "chunk": chunk, "action": "lost_hold", "written": tally.ok + tally.failed}


_BROKERS: dict[tuple[str, str], redis.Redis] = {}


def delivery_hold(task: ClassifierTask, received: float) -> Hold:
    """This delivery's hold on its message, on the app's actual broker (`broker_url`, which
    CELERY_BROKER_URL or the app's config may point away from SAFETY_REDIS_URL) and the transport's actual
    `unacked_index` key; one client per broker per process. No client when the broker is not Redis (warned
    at start: `broker_warning`) or the task has no app (a test)."""
    tag = delivery_tag(task)
    app_ = getattr(task, "app", None)
    if not tag or app_ is None:
        return Hold(None, tag, received)
    conf = app_.conf
    url = broker_redis_url(conf.broker_read_url or conf.broker_url)
    key = unacked_index_key(conf.broker_transport_options)
    if url is None:
        return Hold(None, tag, received, key)
    client = _BROKERS.get((url, key))
    if client is None:
        client = _BROKERS[(url, key)] = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=30, socket_keepalive=True, health_check_interval=25
        )
    return Hold(client, tag, received, key)


def broker_warning(app_: Any) -> str | None:
    """What is wrong, if the app's broker is not kombu's Redis transport: a chunk's hold cannot be renewed,
    so one running longer than the visibility timeout is delivered again while it runs."""
    url = app_.conf.broker_read_url or app_.conf.broker_url
    if broker_redis_url(url) is not None:
        return None
    scheme = str(url or "").split("://", 1)[0] or "none"
    return (
        f"the broker ({scheme}://) is not Redis: a worker cannot renew its hold on a chunk's message "
        f"({UNACKED_INDEX}), so a chunk that runs longer than SAFETY_VISIBILITY_TIMEOUT_S is delivered again "
        "while it runs"
    )


def delivery_tag(task: ClassifierTask) -> str | None:
    """The broker's delivery tag of the message this task runs (kombu's virtual transports put it in the
    message properties, which Celery hands the task), or None (a call outside a worker)."""
    properties = getattr(getattr(task, "request", None), "properties", None) or {}
    return properties.get("delivery_tag")


def classify_lines(
    clf: Classifier, indices: list[int], items: list[dict[str, str]]
) -> list[tuple[int, dict[str, Any], bool]]:
    """(index, result line, failed?) per item; an item the engine refuses fails alone, with its reason."""
    # ids first, from the index in the job (the engine would number the items of this chunk from 0)
    pending = [
        (i, {**item, "id": item_id(item.get("id"), i)}) for i, item in zip(indices, items, strict=True)
    ]
    lines: list[tuple[int, dict[str, Any], bool]] = []
    while pending:
        try:
            results = clf.classify([item for _, item in pending])
        except InvalidInputError as e:
            if e.index is None or not 0 <= e.index < len(pending):
                raise
            index, item = pending.pop(e.index)
            reason = str(InvalidInputError(e.reason, field=e.field, index=index))  # the job's index
            lines.append((index, failed_line(index, item["id"], reason), True))
            continue
        lines += [(i, result_line(i, r.to_dict()), False) for (i, _), r in zip(pending, results, strict=True)]
        break
    return lines


def give_up(
    store: JobStore,
    job_id: str,
    chunk: int,
    attempts: int,
    indices: list[int],
    items: list[dict[str, str]],
    error: str,
    nonce: str | None = None,
    tally: Tally | None = None,
) -> dict[str, Any]:
    """Mark the chunk's unwritten items failed, so the rest of the job still finishes, then dead-letter it.

    In that order, and only when this delivery wrote them: a write that fails (Redis unreachable) hands the
    chunk back and the next delivery gives up again, and a chunk is never dead-lettered twice. (A failure
    between the two leaves the items failed, with the reason, and no dead-letter entry; the log has it.) A
    job cancelled, gone or replaced by another of its id (the message's `nonce` is not its) meanwhile gets
    nothing, and the delivery is skipped."""
    lines = [
        (i, json.dumps(failed_line(i, item_id(item.get("id"), i), error)), True)
        for i, item in zip(indices, items, strict=True)
    ]
    written = store.write(job_id, lines, nonce=nonce)  # items an earlier slice stored keep their results
    if written.state in DISCARDED:
        log.info("job %s chunk %d: the job was %s meanwhile; nothing failed or dead-lettered", job_id, chunk,
                 DISCARDED[written.state])  # fmt: skip
        return {"job_id": job_id, "chunk": chunk, "action": written.state}
    if tally is not None:
        tally.add(written)
    if written.ok + written.failed:
        log.error("job %s chunk %d: dead-lettered: %s", job_id, chunk, error)
        store.dead_letter(job_id, chunk, attempts, error, nonce)
    return {"job_id": job_id, "chunk": chunk, "action": "dead-lettered", "failed": written.failed}
