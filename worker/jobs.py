"""The job client: submit a job, read its status, stream its results in item order, cancel or delete it.

Owns: the submission path (validate every item before anything is queued, store the items, send one
task per chunk, resumable with the same job id, one submit of a job at a time under its submit lease; a job
given as a stream of items is checked one item at a time and spooled to an anonymous temporary file, then
stored chunk by chunk from there, so the client's memory is a chunk's, not the job's) and the read path
(status, results by index with a poll, riding out a Redis outage for a bounded time when asked to, a clear
error for a job that is unknown, expired, deleted or lost).
Raises only the `model.errors` hierarchy: InvalidInputError (bad items or job id, the id of a deleted job),
NotFoundError (unknown, expired, deleted, or lost in a Redis restart), UnavailableError (Redis unreachable;
the spool file cannot be written or read), JobBusyError (another process is submitting the job), ConfigError
(SAFETY_REDIS_URL names a DB, password or server that Redis refuses), DeadlineExceededError (a wait ran out
of time, riding out an outage or not), FailedPreconditionError (waiting on a job whose submission stopped
half-way; deleting an open job). The CLI and the gRPC service call this. Must not know: torch, the model,
gRPC; it sends tasks by name and never imports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from itertools import islice
from json.encoder import encode_basestring as quote
from typing import IO, Any, TypeVar

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import InvalidResponse

from model.errors import (
    ConfigError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    JobBusyError,
    NotFoundError,
    UnavailableError,
)
from model.items import item_id
from worker.app import create_app, send_chunk
from worker.items import iter_normalized
from worker.settings import PERCENT_ENCODE, WorkerSettings, env_name, redacted_url, redis_url_problem
from worker.store import FINISHED, SUBMIT_LEASE_S, JobStore, check_job_id, failed_line, new_nonce

CANCELLED = "cancelled: the job was cancelled before this item was classified"
# The error of an item a cancel stopped before it was stored: the job holds no id for it (`id` null, gRPC
# JobResult.id empty), only its index, its position in the items submitted.
NOT_SUBMITTED = (
    "cancelled before it was submitted: the job was cancelled while its items were being stored, before this "
    "one was, so the job has no id for it; `index` is its position in the items submitted"
)
# Errors Redis answers while a connection is set up (SELECT of the URL's DB, AUTH): SAFETY_REDIS_URL is wrong.
SETUP_REFUSED = ("DB index", "SELECT is not allowed", "NOAUTH", "WRONGPASS", "invalid password")
_READ_BATCH = 512
# A submit that finds its job's submit lease held waits this much longer than a lease lasts (which outlasts
# the lease of a submit that died), polling this often.
_LEASE_MARGIN_S = 2.0
_LEASE_POLL_S = 0.2
# A read that rides out a Redis outage (`outage_s`) tries again after this pause, doubled each time up to
# the second one.
_OUTAGE_FIRST_PAUSE_S = 0.1
_OUTAGE_MAX_PAUSE_S = 2.0
# The job client's Redis connection: how long a connect, and a wait for an answer, may take.
_CONNECT_S = 5.0
_ANSWER_S = 15.0
# A read that rides out an outage with less time left than a connect and an answer may take goes through a
# connection whose timeouts are at most half of it (`JobClient._store_for`), but never under this.
_MIN_BOUNDED_S = 0.25
log = logging.getLogger("safety.jobs")
T = TypeVar("T")


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # submitting | queued | running | done | failed | cancelled
    total: int  # items in the job
    done: int  # items classified
    failed: int  # items that could not be classified (their result line says why)
    chunks: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    model: str | None  # the model that classified the job (set by the first chunk)
    error: str | None  # the last dead-lettered chunk's reason, if any
    # which job of this id the status is of (its record's nonce; "" for one the previous release created):
    # how a long read tells the job it followed from a new job of the same id. Not part of `to_dict`.
    nonce: str = field(default="", repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def completed(self) -> int:
        return self.done + self.failed

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["nonce"]
        return {**out, "finished": self.finished}

    @classmethod
    def from_record(cls, job_id: str, r: dict[str, str]) -> JobStatus:
        opt = lambda k: float(r[k]) if r.get(k) else None  # noqa: E731
        return cls(
            job_id=job_id,
            state=r["state"],
            total=int(r["total"]),
            done=int(r.get("done", 0)),
            failed=int(r.get("failed", 0)),
            chunks=int(r["chunks"]),
            created_at=float(r["created"]),
            started_at=opt("started"),
            finished_at=opt("finished"),
            model=r.get("model") or None,
            error=r.get("error") or None,
            nonce=r.get("nonce", ""),
        )


class Prepared:
    """Items validated and serialized for a job, before anything was sent to Redis (`JobClient.prepare`):
    how many, their digest, and their canonical JSON lines in item order, read back as often as needed
    (`lines`, `payloads`; one reader at a time). The lines are a list, or a spool: an anonymous temporary file
    (unlinked when made, so the OS frees it whatever happens to this process) that keeps a job of millions
    of items at a chunk's memory. `close` (or a `with` block) frees the spool."""

    def __init__(self, count: int, digest: str, source: list[str] | IO[bytes]) -> None:
        self.count = count  # items in the job
        self.digest = digest  # of the lines: the same items give the same digest (a resubmit resumes)
        self._source = source  # the lines, or the spool: each line UTF-8 and ended by b"\n"

    @classmethod
    def of_lines(cls, lines: list[str]) -> Prepared:
        return cls(len(lines), _digest(lines), lines)

    @property
    def spooled(self) -> bool:
        return not isinstance(self._source, list)

    def lines(self) -> Iterator[str]:
        """The canonical lines in item order; UnavailableError when the spool cannot be read."""
        if isinstance(self._source, list):
            yield from self._source
            return
        try:
            self._source.seek(0)
            for raw in self._source:  # canonical JSON has no raw newline; UTF-8 no 0x0A inside a character
                yield raw[:-1].decode()
        except OSError as e:
            raise _spool_error(e, "read") from None

    def payloads(self, size: int) -> Iterator[bytes]:
        """The lines in runs of `size` (the last one shorter), in item order, each run one bytes object of
        UTF-8 lines ended by b"\\n" (what `JobStore.upload` takes): read from the spool as they lie
        there, never decoded or split into one object per line. UnavailableError when the spool cannot be
        read."""
        if isinstance(self._source, list):
            for first in range(0, len(self._source), size):
                yield "".join([line + "\n" for line in self._source[first : first + size]]).encode()
            return
        try:
            self._source.seek(0)
            while payload := b"".join(islice(self._source, size)):
                yield payload
        except OSError as e:
            raise _spool_error(e, "read") from None

    def close(self) -> None:
        if not isinstance(self._source, list):
            self._source.close()

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Outage:
    """How one call (`wait`, `results`, `status`) rides out Redis not answering: for up to `budget_s` at a
    time, never past `deadline` (the call's own, monotonic, from its timeout); `since`: when the current
    outage began, which is when the first read that failed was started (None while Redis answers); `pause`:
    before the next try; `bounded`: the connection of the reads near the end of the time left (its timeouts,
    and a store over it; `JobClient._store_for`), closed when the call ends (`JobClient._done`)."""

    job_id: str
    budget_s: float
    deadline: float | None = None
    since: float | None = None
    pause: float = 0.0
    bounded: tuple[float, JobStore] | None = None

    @classmethod
    def of(cls, job_id: str, budget_s: float, timeout_s: float | None = None) -> _Outage | None:
        """None without a budget: Redis unreachable is UnavailableError at once."""
        if budget_s <= 0:
            return None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return cls(job_id, budget_s, deadline)

    def limit(self, start: float) -> float:
        """When retrying ends for an outage that began at `start`: its budget, or the call's deadline."""
        end = start + self.budget_s
        return end if self.deadline is None else min(end, self.deadline)


@dataclass(frozen=True)
class Submitted:
    status: JobStatus
    resumed: bool  # the job id existed with the same items: only what was missing was sent
    sent: int  # chunks sent to the queue by this call


def _line(item: dict[str, str]) -> str:
    """An item's canonical JSON line, stored and digested by every release: json.dumps(item,
    ensure_ascii=False, sort_keys=True), written out directly for a dict of strings to strings (what
    `worker.items` makes; anything else is a TypeError), without building an encoder per item: each string
    as json.dumps(ensure_ascii=False) writes one (`encode_basestring`, the C function its C encoder calls).
    Its keys sorted, ", " between the pairs, ": " in each."""
    return "{" + ", ".join([quote(k) + ": " + quote(v) for k, v in sorted(item.items())]) + "}"


# A spooled job's lines are written, and digested, this many characters (about bytes) at a time.
_SPOOL_BATCH_CHARS = 1 << 16


class _Digest:
    """sha256 of the UTF-8 lines joined by newlines, fed a line, or several joined by newlines, at a time:
    every release's digest."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._first = True

    def add(self, line: bytes) -> None:
        """One line, or several joined by b"\\n" (the same digest as one at a time)."""
        if not self._first:
            self._sha.update(b"\n")
        self._first = False
        self._sha.update(line)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _digest(lines: Iterable[str]) -> str:
    digest = _Digest()
    for line in lines:
        digest.add(line.encode())
    return digest.hexdigest()


def legacy_digest(lines: Iterable[str]) -> str:
    """The digest the previous release's CLI and JobClient gave these items: they stored an item without an id
    without one, where every item now has its id (its own, else its index as a string). A resume of a job
    they started is accepted on either digest (this one is computed only when the current one differs)."""

    def old() -> Iterator[str]:
        for index, line in enumerate(lines):
            item = json.loads(line)
            if item.get("id") == str(index):
                del item["id"]
            yield _line(item)

    return _digest(old())


def _spool_lines(file: IO[bytes], digest: _Digest, lines: list[str]) -> None:
    """Append canonical lines to the spool, each ended by a newline, and add them to the digest."""
    data = "\n".join(lines).encode()
    digest.add(data)
    try:
        file.write(data)
        file.write(b"\n")
    except OSError as e:
        raise _spool_error(e, "write") from None


def _spool_error(e: OSError, doing: str) -> UnavailableError:
    """`doing`: "write" or "read"."""
    try:
        where = f"in {tempfile.gettempdir()}"
    except OSError:  # no usable temporary directory at all (gettempdir tries to write in each candidate)
        where = "(no usable temporary directory)"
    return UnavailableError(
        f"cannot {doing} the job's items in a temporary file {where} (set TMPDIR to a directory with room "
        f"for about the size of the items): {e.strerror or e}"
    )


class _SubmitLease:
    """A submit's hold on its job's submit lease (`JobStore.hold_submit`): one submit at a time stores and
    queues a job, so two submits of one job id at once never queue a chunk twice. `wait_s`: how long to wait
    for another submit's lease (None: a lease's length and a margin; 0: not at all)."""

    def __init__(self, client: JobClient, job_id: str, wait_s: float | None = None) -> None:
        self.client = client
        self.job_id = job_id
        self.token = uuid.uuid4().hex
        self.wait_s = wait_s

    def hold(self) -> bool:
        """Take or renew the lease; while another submit holds it, wait (`wait_s`; by default up to a lease's
        length and a margin, which outlasts the lease of a submit that died). -> True when this submit held
        it since its last call; False when it took a free one (first call, or this submit paused past its
        lease): another submit may have queued chunks meanwhile, so what was sent must be read again.
        JobBusyError when the other submit still holds it after the wait (at once with `wait_s` 0), with the
        other lease's remaining time as its retry hint."""
        store, ttl = self.client.store, self.client.submit_lease_s
        state, left = store.hold_submit(self.job_id, self.token, ttl)
        if state != "busy":
            return state == "renewed"
        patience = ttl + _LEASE_MARGIN_S if self.wait_s is None else max(0.0, self.wait_s)
        if patience > 0:
            self.client.notice(
                f"job {self.job_id} is being submitted by another process; waiting up to {patience:.0f}s for "
                "it"
            )
            deadline = time.monotonic() + patience
            while time.monotonic() < deadline:
                time.sleep(min(_LEASE_POLL_S, max(0.0, deadline - time.monotonic())))
                state, left = store.hold_submit(self.job_id, self.token, ttl)
                if state != "busy":
                    return False
        waited = f"after this submit waited {patience:.0f}s" if patience > 0 else "(this call does not wait)"
        raise JobBusyError(
            f"job {self.job_id!r} is being submitted by another process (a `safety submit` or SubmitJob of "
            f"this job id), still storing and queueing its chunks {waited}; let it finish (`safety job "
            f"status {self.job_id}` leaves `submitting` when it has), or retry after {math.ceil(left)}s if "
            "it was stopped: the same job id and items resume the job",
            retry_after_ms=math.ceil(left * 1000),
        )

    def release(self) -> None:
        """Free the lease (if this submit still holds it); a Redis error leaves it to expire."""
        with contextlib.suppress(redis.RedisError):
            self.client.store.release_submit(self.job_id, self.token)


def _from_url(settings: WorkerSettings, **options: Any) -> redis.Redis:
    """`redis.Redis.from_url(SAFETY_REDIS_URL)`; ConfigError naming the variable, the URL masked, where
    redis-py refuses it: its ValueError may quote part of the password (an unparsable port), so it is not
    shown."""
    try:
        return redis.Redis.from_url(settings.redis_url, decode_responses=True, **options)
    except ValueError:
        problem = redis_url_problem(settings.redis_url) or (
            f"is not a URL redis-py can read ({redacted_url(settings.redis_url)!r}): check its query "
            f"parameters, and {PERCENT_ENCODE}"
        )
        raise ConfigError(problem, field=env_name("redis_url"), file="environment") from None


class JobClient:
    """Talks to Redis (job store) and to the Celery broker (the chunk queue). Thread-safe.

    `notice(message)`: what the client says while it waits on something a person may want to know about
    (Redis unreachable, and back; another process submitting the same job); default: a warning on the
    `safety.jobs` logger."""

    submit_lease_s: float = SUBMIT_LEASE_S  # the submit lease's length (tests shorten it)

    def __init__(self, settings: WorkerSettings, *, notice: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.notice: Callable[[str], None] = notice or (lambda message: log.warning("%s", message))
        self.client = _from_url(settings, socket_connect_timeout=_CONNECT_S, socket_timeout=_ANSWER_S)
        self.store = JobStore(self.client)

    @classmethod
    def from_env(cls, *, notice: Callable[[str], None] | None = None) -> JobClient:
        return cls(WorkerSettings.from_env(), notice=notice)

    @cached_property
    def app(self) -> Celery:
        return create_app(self.settings)

    def close(self) -> None:
        if "app" in self.__dict__:
            self.app.close()
        self.client.close()

    # ---- submission ----------------------------------------------------------------------------------------
    def submit(
        self, items: Iterable[Any], *, job_id: str | None = None, lease_wait_s: float | None = None
    ) -> Submitted:
        """Validate all items, then store and enqueue them chunk by chunk.

        Re-running with the same `job_id` and the same items resumes: chunks already sent are not sent
        again, and a finished job is returned as it is. The same id with other items is refused. A job
        cancelled while it is being submitted stops the submit: the status returned says `cancelled`. One
        submit of a job at a time: another one of the same id (another process, another thread) waits for
        it up to `submit_lease_s` and a margin, then resumes what is left; JobBusyError if it is still busy.
        `lease_wait_s`: wait that long instead (0: JobBusyError at once; the gRPC SubmitJob, whose thread
        must not outlast its caller's deadline).
        """
        with self.prepare(items) as prepared:
            return self.send(prepared, job_id=job_id, lease_wait_s=lease_wait_s)

    def prepare(self, items: Iterable[Any], *, spool: bool | None = None) -> Prepared:
        """Validate and serialize the items, without any Redis call: InvalidInputError for the first bad one.
        A caller that must tell "nothing was sent" from "a job may exist" calls this, then `send`, and closes
        the Prepared (a `with` block).

        `spool`: take the items one at a time and keep their lines in a temporary file (in TMPDIR; about as
        large as the items' JSON), not in memory, so a job of any size costs this process a chunk's memory;
        UnavailableError when that file cannot be written. None: spool unless `items` is a list or a tuple
        (held in memory already, e.g. a gRPC request's items: their lines only cost about as much again).
        """
        if spool is None:
            spool = not isinstance(items, list | tuple)
        validated = self._validate(items)
        if not spool:
            return Prepared.of_lines([_line(it) for it in validated])
        try:
            file = tempfile.TemporaryFile(prefix="safety-submit-")  # noqa: SIM115 (returned open, or closed)
        except OSError as e:
            raise _spool_error(e, "write") from None
        try:
            digest, count, batch, chars = _Digest(), 0, [], 0
            for item in validated:  # an item's error comes before any later item is read
                line = _line(item)
                batch.append(line)
                chars += len(line)
                if chars >= _SPOOL_BATCH_CHARS:
                    _spool_lines(file, digest, batch)
                    count += len(batch)
                    batch, chars = [], 0
            if batch:
                _spool_lines(file, digest, batch)
                count += len(batch)
            try:
                file.flush()
            except OSError as e:
                raise _spool_error(e, "write") from None
        except BaseException:
            with contextlib.suppress(OSError):  # closing re-flushes what failed: the first error is the one
                file.close()
            raise
        return Prepared(count, digest.hexdigest(), file)

    def send(
        self, prepared: Prepared, *, job_id: str | None = None, lease_wait_s: float | None = None
    ) -> Submitted:
        """Store and enqueue prepared items (`submit` = `prepare` + `send`); resumable as `submit` is."""
        count, digest = prepared.count, prepared.digest
        job_id = uuid.uuid4().hex if job_id is None else check_job_id(job_id)
        s = self.settings
        # created, updated and sent_at: stamped by the store, in Redis's clock
        record = {
            "state": "submitting", "total": count, "done": 0, "failed": 0, "chunk_size": s.chunk_size,
            "chunks": math.ceil(count / s.chunk_size), "ttl_s": s.result_ttl_s, "digest": digest,
            "queue": s.queue, "nonce": new_nonce(),
        }  # fmt: skip
        with self._reachable():
            existing = self.store.create(job_id, record)
            resumed = existing is not None
            if resumed and existing != digest and existing != legacy_digest(prepared.lines()):
                raise InvalidInputError(
                    f"job {job_id!r} already exists with different items; choose another job id",
                    field="job_id",
                )
            lease = _SubmitLease(self, job_id, lease_wait_s)
            try:
                # one submit at a time: another one of this id (a second `safety submit`, a SubmitJob)
                # stores and queues it; this one waits, then reads what it left
                lease.hold()
                if resumed:
                    stored = self.store.resume(job_id) or record  # notes the progress of a `submitting` job
                    if stored["state"] in FINISHED:
                        return Submitted(JobStatus.from_record(job_id, stored), resumed=True, sent=0)
                    # the job's own nonce goes into its messages: none for a job the previous release created
                    record = {**record, "nonce": "", **stored}
                self.store.mark_active(job_id)  # the lost-chunk sweeper watches it from now on
                sent = self._enqueue(job_id, prepared, record, lease)
                if self.store.seal(job_id) in ("queued", "running"):
                    # again: the sweeper drops a submit that paused over SUBMIT_STALL_S (Ctrl-Z, a sleeping
                    # laptop) from the list; a submit that went on since must be watched (a no-op if listed)
                    self.store.mark_active(job_id)
            finally:
                lease.release()
        return Submitted(self.status(job_id), resumed=resumed, sent=sent)

    def _validate(self, items: Iterable[Any]) -> Iterator[dict[str, str]]:
        return iter_normalized(items, max_text_chars=self.settings.max_text_chars)

    def _enqueue(self, job_id: str, prepared: Prepared, record: dict[str, Any], lease: _SubmitLease) -> int:
        """Store and send each chunk not marked sent, marking it after it was sent (a submit that dies in
        between leaves it unmarked: a resume sends it again, at least once). Under the job's submit lease,
        renewed before a chunk is stored and again before it is sent: while this submit holds it no other
        submit sends a chunk, so the chunks read as sent stay true; a lease taken anew (this submit paused
        past it, another may have run) has them read again. The renewal before a send is not one step with
        the send (the broker may be another Redis): a pause between the two longer than the lease lets
        another submit send the chunk too, one redundant delivery (results are still written once)."""
        size, chunks = int(record["chunk_size"]), int(record["chunks"])
        already = self.store.enqueued(job_id)

        def sent_meanwhile(chunk: int) -> bool:
            """Renew the lease; taken anew, another submit may have sent `chunk` meanwhile: read again."""
            nonlocal already
            if lease.hold():
                return False
            already = self.store.enqueued(job_id)
            return chunk in already

        sent = 0
        with self.app.producer_or_acquire() as producer:
            for chunk, lines in zip(range(chunks), prepared.payloads(size), strict=False):
                if chunk in already or sent_meanwhile(chunk):
                    continue
                first = chunk * size
                if not self.store.upload(job_id, first, lines):
                    break  # cancelled while it was being submitted: stop storing and sending
                if sent_meanwhile(chunk):  # the upload outlasted the lease (a huge chunk, a slow link)
                    continue
                send_chunk(self.app, job_id, chunk, record["queue"], producer, record["nonce"])
                sent += 1  # a worker skips the chunk of a job cancelled in the meantime
                if not self.store.mark_enqueued(job_id, chunk):
                    break
        return sent

    # ---- reading -------------------------------------------------------------------------------------------
    def status(self, job_id: str, *, outage_s: float = 0.0, timeout: float | None = None) -> JobStatus:
        """The job's status. `outage_s`: ride out Redis being unreachable for up to that long, and within
        `timeout` (as `wait`: DeadlineExceededError when the timeout ends it)."""
        check_job_id(job_id)
        outage = _Outage.of(job_id, outage_s, timeout)
        try:
            return self._status(job_id, outage)
        finally:
            self._done(outage)

    def _status(self, job_id: str, outage: _Outage | None) -> JobStatus:
        record = self._read(outage, lambda store: store.get(job_id))
        if record is None:
            raise self._deleted(job_id, outage) or NotFoundError(
                f"job {job_id!r} not found: never submitted, expired (jobs are kept "
                f"{self.settings.result_ttl_s}s), or lost when Redis restarted without persistence"
            )
        return JobStatus.from_record(job_id, record)

    def _deleted(self, job_id: str, outage: _Outage | None = None) -> NotFoundError | None:
        """NotFoundError for a deleted job whose id is still reserved (its tombstone); None otherwise."""
        until = self._read(outage, lambda store: store.deleted_until(job_id))
        if until is None:
            return None
        return NotFoundError(f"job {job_id!r} not found: it was deleted; its id stays reserved until {until}")

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_s: float = 0.25,
        on_progress: Callable[[JobStatus], None] | None = None,
        outage_s: float = 0.0,
        known: JobStatus | None = None,
    ) -> JobStatus:
        """Poll until the job finishes. DeadlineExceededError after `timeout` seconds; NotFoundError at once
        when the job disappears (Redis lost it) or is another job of its id; UnavailableError when Redis
        cannot be reached: at once, or with `outage_s`, once it has not answered for that long (counted from
        the start of the first read that failed; DeadlineExceededError when `timeout` comes first): until
        then each read is retried with a growing pause, each try ending by then (`_store_for`), and `notice`
        says that Redis is unreachable (and for how much longer this retries) and, later, back.
        `known`: the job's status as the caller last read it (a job it submitted): a job missing at the first
        read then disappeared, rather than was never found."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = _Outage.of(job_id, outage_s, timeout)
        try:
            status = self._first_status(job_id, known, outage)
            while True:
                if on_progress is not None:
                    on_progress(status)
                if status.finished:
                    return status
                self._check_submission(job_id, status, outage)
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"job {job_id!r} is still {status.state} after {timeout}s "
                        f"({status.completed}/{status.total} items)"
                    )
                time.sleep(poll_s)
                status = self._still_there(job_id, status, outage)
        finally:
            self._done(outage)

    def results(
        self,
        job_id: str,
        *,
        start: int = 0,
        timeout: float | None = None,
        poll_s: float = 0.25,
        outage_s: float = 0.0,
        known: JobStatus | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Result lines in item order from index `start`, each as soon as it and all before it exist.

        Follows a running job until it finishes; items of a cancelled job that were never classified
        come back as failed lines (`CANCELLED`; `NOT_SUBMITTED`, with `id` None, for an item the cancel
        stopped before it was stored). Raises as `wait` does, and rides out a Redis outage as it does with
        `outage_s`; `timeout` bounds the whole stream; `known` as for `wait`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = _Outage.of(job_id, outage_s, timeout)
        try:
            yield from self._results(job_id, max(0, start), deadline, timeout, poll_s, outage, known)
        finally:
            self._done(outage)

    def _results(
        self,
        job_id: str,
        index: int,
        deadline: float | None,
        timeout: float | None,
        poll_s: float,
        outage: _Outage | None,
        known: JobStatus | None,
    ) -> Iterator[dict[str, Any]]:
        status = self._first_status(job_id, known, outage)
        while index < status.total:
            hi = min(status.total, index + _READ_BATCH)
            batch = self._read(outage, lambda store, lo=index, hi=hi: store.results(job_id, lo, hi))
            for raw in batch:
                if raw is None:
                    break
                yield json.loads(raw)
                index += 1
            else:
                continue
            # A gap: the item at `index` has no result yet.
            if status.state == "cancelled":
                yield from self._cancelled_lines(job_id, status, index, hi, outage)
                index = hi
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceededError(
                    f"job {job_id!r}: result {index} not ready after {timeout}s (job {status.state}, "
                    f"{status.completed}/{status.total} items)"
                )
            if status.finished:  # finished between our reads: read again before polling
                status = self._still_there(job_id, status, outage)
                again = self._read(outage, lambda store, at=index: store.results(job_id, at, at + 1))
                if again[0] is None:
                    raise NotFoundError(f"job {job_id!r}: result {index} is missing (expired or lost)")
                continue
            self._check_submission(job_id, status, outage)
            time.sleep(poll_s)
            status = self._still_there(job_id, status, outage)

    def _first_status(self, job_id: str, known: JobStatus | None, outage: _Outage | None) -> JobStatus:
        if known is None:
            return self._status(job_id, outage)
        check_job_id(job_id)
        return self._still_there(job_id, known, outage)

    def check_submission(self, job_id: str, status: JobStatus) -> None:
        """FailedPreconditionError when the job is still `submitting` and its submitter has stored nothing for
        SUBMIT_STALL_S (an interrupted `safety submit`, a server that crashed during a SubmitJob): nothing
        will finish it but a resumed submit, so a wait on it would never end."""
        self._check_submission(job_id, status, None)

    def _check_submission(self, job_id: str, status: JobStatus, outage: _Outage | None) -> None:
        if status.state != "submitting":
            return
        # in Redis's clock, as `sent_at` is stamped
        stalled = self._read(outage, lambda store: store.stalled_submission(job_id))
        if stalled is None:
            return
        items, chunks, idle = stalled
        raise FailedPreconditionError(
            f"job {job_id!r} is not fully submitted: its submission stopped at {items} of {status.total} "
            f"items ({chunks} of {status.chunks} chunks queued, nothing stored for {idle:.0f}s); resume it "
            f"with `safety submit FILE --job-id {job_id}` (or SubmitJob with the same job_id and items), or "
            "cancel it"
        )

    def _cancelled_lines(
        self, job_id: str, last: JobStatus, lo: int, hi: int, outage: _Outage | None
    ) -> Iterator[dict[str, Any]]:
        """The lines of items lo..hi-1 of a job seen cancelled (`last`): its results, `CANCELLED` for an item
        it stored, `NOT_SUBMITTED` for one it never stored. Results, items and the record are read at one
        instant (`JobStore.gap`): a missing item is "never stored" only while the same job's record is
        there; a job deleted, expired or lost (flushed, a restart) meanwhile, or replaced by a new job of its
        id, raises as `_still_there` does instead of passing its items for never stored."""
        read = self._read(outage, lambda store: store.gap(job_id, lo, hi))
        if read is None or read[0] != last.nonce:
            raise self._gone(job_id, last, outage, replaced=read is not None)
        _, written, items = read
        for index, raw, item in zip(range(lo, hi), written, items, strict=True):
            if raw is not None:
                yield json.loads(raw)
            elif item is None:  # never stored (a submit cancelled midway): its id never reached the job
                yield failed_line(index, None, NOT_SUBMITTED)
            else:  # stored: its id (an item the previous release stored without one: its index)
                yield failed_line(index, item_id(item.get("id"), index), CANCELLED)

    def _still_there(self, job_id: str, last: JobStatus, outage: _Outage | None = None) -> JobStatus:
        """The job's status now; NotFoundError when it is gone, or is another job of its id than `last`'s."""
        record = self._read(outage, lambda store: store.get(job_id))
        if record is None:
            raise self._gone(job_id, last, outage)
        status = JobStatus.from_record(job_id, record)
        if last.nonce and status.nonce != last.nonce:
            raise self._gone(job_id, last, outage, replaced=True)
        return status

    def _gone(
        self, job_id: str, last: JobStatus, outage: _Outage | None, *, replaced: bool = False
    ) -> NotFoundError:
        """The error for a job that was there (`last`) and no longer is: deleted (its tombstone), replaced by
        a new job of its id, or lost."""
        was = f"while {last.state} ({last.completed}/{last.total} items)"
        if replaced:
            return NotFoundError(
                f"job {job_id!r} disappeared {was}: it expired and a new job was submitted with its id; its "
                "results are gone: submit it again with another job id"
            )
        return self._deleted(job_id, outage) or NotFoundError(
            f"job {job_id!r} disappeared {was}: Redis lost its data (a restart without persistence, a flush "
            "or an eviction) or the job expired; submit it again"
        )

    def _read(self, outage: _Outage | None, read: Callable[[JobStore], T]) -> T:
        """`read(store)`, a Redis read; given an `outage`, retried while Redis cannot be reached until the
        outage has lasted its budget (counted from the start of the first read that failed: a Redis that
        hangs spends its time there) or the call's deadline came: then UnavailableError, or
        DeadlineExceededError when the deadline ended it, naming the job. Each try ends by that limit
        (`_store_for`). `notice` says when Redis stops answering and when it answers again."""
        while True:
            began = time.monotonic()
            try:
                with self._reachable():
                    value = read(self.store if outage is None else self._store_for(outage, began))
            except UnavailableError as e:
                if outage is None:
                    raise
                first = outage.since is None
                if outage.since is None:
                    outage.since, outage.pause = began, _OUTAGE_FIRST_PAUSE_S
                self._ride_out(outage, outage.since, e, first)
                continue
            if outage is not None and outage.since is not None:
                down = time.monotonic() - outage.since
                self.notice(f"job {outage.job_id}: Redis answers again after {down:.0f}s; going on")
                outage.since = None
            return value

    def _store_for(self, outage: _Outage, began: float) -> JobStore:
        """The store a read riding out an outage goes through, so that it ends by the outage's limit: the
        client's own while that is further away than a connect and an answer may take (`_CONNECT_S`,
        `_ANSWER_S`); nearer, a connection of the call's own whose connect and answer timeouts are each at
        most half the time left (at least `_MIN_BOUNDED_S`), so a Redis that does not answer at all (kill
        -STOP, a dropped network) ends the try at most 2 * `_MIN_BOUNDED_S` past the limit. That connection
        is made again, with shorter timeouts, only when the time left has halved: a few per call."""
        left = outage.limit(began if outage.since is None else outage.since) - began
        if left >= _CONNECT_S + _ANSWER_S:
            return self.store
        allowed = max(_MIN_BOUNDED_S, left / 2)
        if outage.bounded is not None and outage.bounded[0] <= allowed:
            return outage.bounded[1]
        self._done(outage)
        timeout = max(_MIN_BOUNDED_S, left / 4)
        client = _from_url(self.settings, socket_connect_timeout=timeout, socket_timeout=timeout)
        outage.bounded = (timeout, JobStore(client))
        return outage.bounded[1]

    @staticmethod
    def _done(outage: _Outage | None) -> None:
        """Close the call's own connection (`_store_for`), if it made one."""
        if outage is not None and outage.bounded is not None:
            with contextlib.suppress(redis.RedisError):
                outage.bounded[1].client.close()
            outage.bounded = None

    def _ride_out(self, outage: _Outage, since: float, error: UnavailableError, first: bool) -> None:
        """Pause before the next try of a read that found Redis unreachable (in an outage that began at
        `since`; `first`: its first failed read, which `notice` announces), or raise when the outage has
        lasted its budget (UnavailableError) or the call's deadline has come (DeadlineExceededError)."""
        now = time.monotonic()
        limit = outage.limit(since)
        said = f"job {outage.job_id!r}: {str(error).rstrip('.')}"
        if now >= limit:
            down = f"no answer for {now - since:.0f}s of retrying"
            if outage.deadline is not None and outage.deadline <= since + outage.budget_s:
                raise DeadlineExceededError(f"{said}; {down} when the timeout ran out") from error
            raise UnavailableError(f"{said}; {down}") from error
        if first:  # the read that failed may have waited for an answer (a Redis that hangs): say so
            waited = now - since
            more = f" more (no answer for {waited:.0f}s so far)" if waited >= 1 else ""
            self.notice(
                f"job {outage.job_id}: {str(error).rstrip('.')}; retrying for up to "
                f"{math.ceil(limit - now)}s{more}"
            )
        time.sleep(min(outage.pause, limit - now))
        outage.pause = min(outage.pause * 2, _OUTAGE_MAX_PAUSE_S)

    # ---- control -------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobStatus:
        """Stop a job: queued chunks are skipped, results written so far stay readable."""
        check_job_id(job_id)
        with self._reachable():
            self.store.cancel(job_id)
        return self.status(job_id)  # NotFoundError when there was no such job

    def delete(self, job_id: str) -> JobStatus:
        """Delete every key of a finished (done, failed) or cancelled job: its items, results and record, so
        its memory is freed. Its id stays reserved (a new job of that id is refused) until the job would
        have expired: chunk messages of a cancelled job may still be queued, and must never act on a new
        job. Returns the job as it was. NotFoundError for an unknown, expired or already deleted job;
        FailedPreconditionError for one still submitting, queued or running (cancel it first: its workers
        and submitter stop, then delete it)."""
        check_job_id(job_id)
        with self._reachable():
            outcome, record = self.store.delete(job_id)
        if outcome == "gone" or record is None:
            raise self._deleted(job_id) or NotFoundError(
                f"job {job_id!r} not found: never submitted, expired, or deleted"
            )
        if outcome == "open":
            raise FailedPreconditionError(
                f"job {job_id!r} is {record['state']}: only a finished or cancelled job can be deleted; "
                "cancel it first"
            )
        return JobStatus.from_record(job_id, record)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead-lettered chunks: {job_id, chunk, attempts, error, at}."""
        with self._reachable():
            return self.store.dead_letters(limit)

    def ping(self) -> None:
        """Check SAFETY_REDIS_URL: ConfigError when the server there refuses this configuration (a DB index
        out of range, a wrong password) or is not Redis; UnavailableError when nothing answers."""
        with self._reachable():
            self.client.ping()

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        url = redacted_url(self.settings.redis_url)
        try:
            yield
        except redis.AuthenticationError as e:  # a ConnectionError, but retrying will not help
            raise self._bad_url(f"Redis at {url} refused the credentials: {e}") from e
        except (redis.ConnectionError, redis.TimeoutError, OperationalError) as e:
            raise UnavailableError(f"Redis at {url} is unreachable: {e}") from e
        except redis.ResponseError as e:
            if not any(m in str(e) for m in SETUP_REFUSED):
                raise  # a command's own error: a bug, not the configuration
            raise self._bad_url(f"Redis at {url} refused the connection's setup: {e}") from e
        except InvalidResponse as e:
            raise self._bad_url(f"the server at {url} does not answer as Redis does ({e})") from e

    @staticmethod
    def _bad_url(message: str) -> ConfigError:
        return ConfigError(message, field=env_name("redis_url"), file="environment")
