"""Lost chunks: find the chunk messages the Redis broker lost, and send them again.

Owns: the sweep. kombu's Redis transport takes a message off the queue with BRPOP and only afterwards
records it as unacknowledged; a worker killed between the two (kill -9, the OOM killer) loses the message
for good: no visibility timeout brings it back (celery/kombu#305), and its job would stay `running` forever.
Every `safety worker` runs a `Sweeper` thread in its main process. Each round, under a Redis lock (one
sweeper at a time across workers), it looks at the open jobs (`safety:jobs:open`); a job that has made
no progress for `stall_s` and still has enqueued chunks without all their results gets its broker checked:
a chunk whose message is neither in the queue's lists nor in the unacknowledged hash is re-sent, as its
submitter sent it: with the job record's nonce (`worker.store`; none for a record the previous release
created), so the message acts on this job and no other of its id. The chunk task is idempotent (the first
result written per item wins), so the rare false positive — a message caught in that same BRPOP gap of a
live worker — costs one redundant delivery, never a duplicate result.
Finished or expired jobs leave that list, and so does a job whose submission stopped (still `submitting`
with nothing stored for `SUBMIT_STALL_S`, in Redis's clock) until a resumed submit puts it back; a job is
read again after its removal and put back if a submit (re)started it meanwhile. Must not know: torch, the
model.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from worker.settings import WorkerSettings
from worker.store import FINISHED, SUBMIT_STALL_S, JobStore, last_submit_progress

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("safety.worker.reclaim")

LOCK = "safety:jobs:sweeper"
UNACKED = "unacked"  # kombu's Redis transport: delivery tag -> JSON [message, exchange, routing key]
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport keeps priorities 3, 6, 9 in lists `queue<SEP><pri>`
PAGE = 1000
LONG_BACKLOG = 10_000  # messages; beyond this the sweeper reads the broker at most once per stall period


@dataclass(frozen=True)
class Resent:
    job_id: str
    chunk: int


def queue_lists(queue: str) -> list[str]:
    return [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9)]


def _task_id(raw: str, unacked: bool) -> str | None:
    try:
        message = json.loads(raw)
        if unacked:
            message = message[0]
        return message["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not a Celery task message: not ours


def broker_task_ids(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """Task ids of every message waiting in `queues` (all priority lists) or taken and not yet acked."""
    ids: set[str] = set()

    def pages(key: str) -> Iterator[list[str]]:
        start = 0
        while page := client.lrange(key, start, start + PAGE - 1):
            yield page
            start += PAGE

    for queue in queues:
        for key in queue_lists(queue):
            for page in pages(key):
                ids.update(t for raw in page if (t := _task_id(raw, unacked=False)))
    for _tag, raw in client.hscan_iter(UNACKED, count=PAGE):
        if t := _task_id(raw, unacked=True):
            ids.add(t)
    return ids


def backlog(client: redis.Redis, queues: Iterable[str]) -> int:
    """Messages waiting in `queues` (all priority lists) plus those taken and not yet acknowledged."""
    return sum(client.llen(key) for q in queues for key in queue_lists(q)) + client.hlen(UNACKED)


def sweep(
    store: JobStore,
    resend: Callable[[str, int, str, str | None], None],
    *,
    now: float,
    stall_s: float,
    task_id: Callable[[str, int], str],
    may_scan: Callable[[int], bool] = lambda backlog: True,
) -> list[Resent]:
    """One round: re-send the lost chunks of stalled jobs; drop finished or expired jobs from the active set.
    `resend(job_id, chunk, queue, nonce)` publishes a chunk task (`nonce`: the job record's, None when it has
    none); `may_scan(backlog)` can defer reading a long
    broker backlog (a stalled job behind it is most likely just waiting)."""
    stalled: list[tuple[str, str, str | None, list[int]]] = []
    for job_id in store.active():
        record = store.get(job_id)
        if record is None or record.get("state") in FINISHED:
            unwatch(store, job_id, now)
            continue
        if record.get("state") == "submitting":
            if not watched(record, now):
                # its submitter stopped (interrupted, killed): nothing more will be queued until a resumed
                # submit puts it back on the list, and the list must not keep a KEDA-scaled worker up for it
                log.info("job %s: its submission stopped; no longer watched until it is resumed", job_id)
                unwatch(store, job_id, now)
            continue  # else its submitter is still sending chunks
        if record.get("state") not in ("queued", "running"):
            continue
        last = max(float(record.get(k) or 0) for k in ("created", "started", "updated"))
        if now - last < stall_s:
            continue
        if missing := store.incomplete_chunks(job_id):
            stalled.append((job_id, record["queue"], record.get("nonce") or None, missing))
    queues = {queue for _, queue, _, _ in stalled}
    if not stalled or not may_scan(backlog(store.client, queues)):
        return []
    present = broker_task_ids(store.client, queues)
    resent = []
    for job_id, queue, nonce, chunks in stalled:
        for chunk in chunks:
            if task_id(job_id, chunk) not in present:
                log.warning(
                    "job %s chunk %d: no message in the broker for it and no progress for %.0fs; the broker "
                    "lost it (a worker died between taking it and recording it): sent again",
                    job_id, chunk, stall_s,
                )  # fmt: skip
                resend(job_id, chunk, queue, nonce)
                resent.append(Resent(job_id, chunk))
    return resent


def watched(record: dict[str, str] | None, now: float) -> bool:
    """Whether a job belongs on the open list: queued, running, or being submitted by a live submitter."""
    if record is None:
        return False
    state = record.get("state")
    if state == "submitting":
        return now - last_submit_progress(record) < SUBMIT_STALL_S
    return state in ("queued", "running")


def unwatch(store: JobStore, job_id: str, now: float) -> None:
    """Take a job off the open list, then read it again and put it back if it belongs there after all: a
    submit that (re)started it between our read and the removal found the id still listed, so its own
    `mark_active` was a no-op (the record and the list are in different Redis Cluster slots: no one script
    can check one and change the other)."""
    store.forget_active(job_id)
    if watched(store.get(job_id), now):
        log.info("job %s: submitted again meanwhile; still watched", job_id)
        store.mark_active(job_id)


class Sweeper:
    """Runs `sweep` every `interval_s` in a daemon thread, one sweeper at a time across all workers."""

    def __init__(
        self,
        store: JobStore,
        resend: Callable[[str, int, str, str | None], None],
        task_id: Callable[[str, int], str],
        *,
        stall_s: float,
        interval_s: float,
        on_resent: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.store, self.resend, self.task_id = store, resend, task_id
        self.stall_s, self.interval_s, self.on_resent = stall_s, interval_s, on_resent
        self.token = uuid.uuid4().hex
        self.rounds = 0
        self._last_long_scan = -float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="safety-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run_once(self) -> list[Resent]:
        """One round if this process holds the lock (kept for two intervals, renewed by its holder's rounds),
        else nothing."""
        lock_ms = max(1000, int(2 * self.interval_s * 1000))
        client = self.store.client
        if not client.set(LOCK, self.token, nx=True, px=lock_ms) and client.get(LOCK) != self.token:
            return []
        client.pexpire(LOCK, lock_ms)
        now = self.store.server_time()  # the clock `sent_at` is stamped in (a submitter's may be off)
        resent = sweep(
            self.store, self.resend, now=now, stall_s=self.stall_s, task_id=self.task_id,
            may_scan=lambda n: self._may_scan(n, now),
        )  # fmt: skip
        self.rounds += 1
        if resent:
            self.on_resent(len(resent))
        return resent

    def _may_scan(self, backlog: int, now: float) -> bool:
        """A backlog of up to LONG_BACKLOG messages is read every round; a longer one at most once per
        `stall_s` (reading 100k messages moves ~100 MB out of Redis)."""
        if backlog <= LONG_BACKLOG:
            return True
        if now - self._last_long_scan < self.stall_s:
            return False
        self._last_long_scan = now
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # Redis away for a while: the next round tries again
                log.warning("lost-chunk sweep failed; retrying in %.0fs", self.interval_s, exc_info=True)


def resender(app: Celery) -> Callable[[str, int, str, str | None], None]:
    """The sweeper's `resend`: publish a chunk's message again through `app`, as its submitter did (the same
    args: the job's nonce when its record has one)."""
    from worker.app import send_chunk

    def resend(job_id: str, chunk: int, queue: str, nonce: str | None) -> None:
        with app.producer_or_acquire() as producer:
            send_chunk(app, job_id, chunk, queue, producer, nonce)

    return resend


def start_sweeper(settings: WorkerSettings) -> Sweeper:
    """The worker's sweeper: stalled means no progress for one visibility timeout (a live chunk that takes
    longer keeps its message in the unacknowledged hash, so it is never re-sent); a round every quarter of
    it, at least every minute."""
    from worker.app import app, chunk_task_id
    from worker.metrics import process_metrics

    resend = resender(app)
    vt = settings.visibility_timeout_s
    metrics = process_metrics()
    store = JobStore.for_worker(settings.redis_url)
    interval = max(1.0, min(60.0, vt / 4))
    return Sweeper(
        store, resend, chunk_task_id, stall_s=vt, interval_s=interval, on_resent=metrics.resent.inc
    ).start()
