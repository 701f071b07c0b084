"""The job RPCs of `safety.v1.SafetyClassifier`: SubmitJob, GetJob, StreamJobResults, CancelJob, DeleteJob.

Owns: protobuf <-> job-client conversion (`job_items_from_proto`, `job_to_proto`, `job_result_to_proto`),
the per-request item limit of SubmitJob (`check_job_size`, SAFETY_MAX_JOB_ITEMS), the start-up check of
the job settings (`check_job_settings`), the lazy creation of the one `worker.jobs.JobClient` (imported on
first use; without the worker extra the RPCs raise UnsupportedError), running its blocking Redis calls in
a small thread pool off the event loop, and streaming results page by page (waiting with asyncio, never in
a thread). Errors are the job client's
`model.errors` (UnavailableError when Redis is unreachable, ConfigError when it refuses SAFETY_REDIS_URL,
NotFoundError, InvalidInputError, FailedPreconditionError for a stopped submission or deleting an open job,
JobBusyError at once for a SubmitJob of a job another submit is storing: a job thread never waits on a
submit lease); service/errors.py maps them. Must not know: Celery, Redis keys, torch, the model (it never
imports them).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from model.errors import (
    DeadlineExceededError,
    InvalidInputError,
    NotFoundError,
    ShuttingDownError,
    UnsupportedError,
)
from model.items import item_id
from service.settings import ServeSettings
from service.stubs import pb2

if TYPE_CHECKING:
    from worker.jobs import JobClient, JobStatus
    from worker.settings import WorkerSettings

log = logging.getLogger("safety.service")
T = TypeVar("T")
JobClientFactory = Callable[[], "JobClient"]

ROLES = {pb2.ROLE_UNSPECIFIED: "prompt", pb2.ROLE_PROMPT: "prompt", pb2.ROLE_RESPONSE: "response"}
STATES = {
    "submitting": pb2.JOB_STATE_SUBMITTING,
    "queued": pb2.JOB_STATE_QUEUED,
    "running": pb2.JOB_STATE_RUNNING,
    "done": pb2.JOB_STATE_DONE,
    "failed": pb2.JOB_STATE_FAILED,
    "cancelled": pb2.JOB_STATE_CANCELLED,
}
WORKER_MODULES = frozenset({"worker", "celery", "kombu", "redis"})  # missing: no worker extra
PAGE = 512  # result lines read from Redis per thread-pool call
POLL_S = 0.25  # StreamJobResults(wait=true): pause between reads while the next result is not written
THREADS = 8  # blocking job-client calls in flight at once (waits happen on the event loop, not here)


def job_items_from_proto(request: Any) -> list[dict[str, str]]:
    """SubmitJobRequest.items -> job items (`worker.jobs` validates them fully before anything is queued,
    and gives an empty id the item's index, as Classify does, in the same place for every front end)."""
    items = []
    for i, it in enumerate(request.items):
        role = ROLES.get(it.role)
        if role is None:
            raise InvalidInputError(
                f"unknown role {it.role}; use ROLE_PROMPT or ROLE_RESPONSE", index=i, field="role"
            )
        item = {"id": it.id, "text": it.text, "role": role}
        if it.context:
            item["context"] = it.context
        items.append(item)
    return items


def check_job_size(items: int, limit: int | None) -> None:
    """InvalidInputError when a SubmitJob request has more than `limit` items (SAFETY_MAX_JOB_ITEMS). The
    server holds a job's items in memory while it stores them (some 500 bytes an item beyond the texts);
    `safety submit` streams a file of any size to Redis instead."""
    if limit is not None and items > limit:
        raise InvalidInputError(
            f"{items:,} items, more than the limit of {limit:,} per SubmitJob request "
            "(SAFETY_MAX_JOB_ITEMS); a job is submitted in one request and cannot be added to later: split "
            "the items over several jobs, or submit them with `safety submit` (it streams a JSONL file of "
            "any size to Redis)",
            field="items",
            limit=limit,
            value=items,
            setting="SAFETY_MAX_JOB_ITEMS",
        )


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def job_to_proto(status: JobStatus) -> Any:
    return pb2.Job(
        job_id=status.job_id,
        state=STATES.get(status.state, pb2.JOB_STATE_UNSPECIFIED),
        total=status.total,
        done=status.done,
        failed=status.failed,
        chunks=status.chunks,
        created_at=_timestamp(status.created_at),
        started_at=_timestamp(status.started_at),
        finished_at=_timestamp(status.finished_at),
        model=status.model or "",
        error=status.error or "",
        finished=status.finished,
    )


def job_result_to_proto(line: Mapping[str, Any], thresholds: Mapping[str, float]) -> Any:
    """A worker result line ({index, <Result.to_dict()>, error}) -> JobResult; `thresholds` fills
    LabelScore.threshold (labels it lacks get 0)."""
    index, error = line["index"], line.get("error")
    result_id = _result_id(line)
    if error:
        return pb2.JobResult(index=index, id=result_id, error=error)
    flagged = set(line["flagged_labels"])
    scores = [
        pb2.LabelScore(
            label=label,
            score=score,
            flagged=label in flagged,
            threshold=thresholds.get(label, 0.0),
            span=pb2.Span(start=line["spans"][label][0], end=line["spans"][label][1]),
            logit=line["logits"][label],
        )
        for label, score in line["scores"].items()
    ]
    result = pb2.Result(
        id=result_id,
        flagged=line["flagged"],
        scores=scores,
        tokens=line["tokens"],
        windows=line["windows"],
        flagged_labels=line["flagged_labels"],
    )
    return pb2.JobResult(index=index, id=result_id, result=result)


def _result_id(line: Mapping[str, Any]) -> str:
    """A line's JobResult.id: its `id`; for a null one, the item's index (a line written before ids defaulted
    to the index), except for an item a cancel stopped before it was stored (`worker.jobs.NOT_SUBMITTED`):
    the job has no id for it, and "" says so rather than an index that could be another item's id."""
    given = line.get("id")
    if given is None and line.get("error"):
        from worker.jobs import NOT_SUBMITTED  # a line exists only where the job client does

        if line["error"] == NOT_SUBMITTED:
            return ""
    return item_id(given, line["index"])


def job_settings(settings: ServeSettings) -> WorkerSettings:
    """The job RPCs' settings: `SAFETY_REDIS_URL`, `SAFETY_QUEUE`, `SAFETY_CHUNK_SIZE`, ... as the workers
    read them (worker.settings). The settings the server has too (the engine's, SAFETY_LOG_FORMAT,
    SAFETY_LOG_LEVEL, SAFETY_DRAIN_GRACE_S, ...) are the server's values, which a command-line flag may have
    set: their variables are not read again here (a `--log-format text` wins over SAFETY_LOG_FORMAT=logfmt,
    as it does for the rest of the server). ConfigError naming the variable (a URL in it with its credentials
    masked) for one that does not parse or is out of range."""
    from dataclasses import fields

    from worker.settings import WorkerSettings

    own = {f.name for f in fields(WorkerSettings)}
    shared = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name in own}
    return WorkerSettings.from_env(**shared)


def check_job_settings(settings: ServeSettings) -> None:
    """At start-up, when the job RPCs are served (the worker extra is installed; without it they answer
    UNIMPLEMENTED and need no settings): ConfigError for a job setting that `job_settings` refuses, so a
    misconfigured server stops at once instead of failing its first job call. Redis itself is not
    contacted: the server starts, and Classify works, whether or not Redis is up."""
    if _worker_extra_installed():
        job_settings(settings)


def _worker_extra_installed() -> bool:
    for name in sorted(WORKER_MODULES - {"worker"}):  # the extra's packages (`worker` is ours, always here)
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except ValueError:  # in sys.modules as None: refused on import
            return False
    return True


def default_job_client(settings: ServeSettings) -> JobClientFactory:
    """The server's job client, made from `job_settings` (read when it is made: on the first job RPC)."""

    def make() -> JobClient:
        from worker.jobs import JobClient

        return JobClient(job_settings(settings))

    return make


class JobService:
    """What the job RPCs do, given a job-client factory. Thread pool and client are created on first use."""

    def __init__(
        self,
        factory: JobClientFactory,
        thresholds: Callable[[str], Mapping[str, float]],
        draining: Callable[[], bool] = lambda: False,
        max_items: int | None = None,
    ) -> None:
        """`thresholds(model_name)`: the default thresholds to report for a job's model ({} if unknown).
        `draining()`: is the server draining (open result streams then end, saying where to resume)?
        `max_items`: items per SubmitJob request (SAFETY_MAX_JOB_ITEMS; None: no limit)."""
        self.factory = factory
        self.max_items = max_items
        self.thresholds = thresholds
        self.draining = draining
        self._client: JobClient | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a pool thread, in a copy of the call's context: its log lines (the job client's
        Redis retries) carry the call's request id."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="safety-jobs")
        in_context = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self._pool, in_context, fn, *args)

    def _make_client(self) -> JobClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self.factory()
                except ModuleNotFoundError as e:
                    if (e.name or "").split(".")[0] not in WORKER_MODULES:
                        raise
                    raise UnsupportedError(
                        f"the jobs API needs the worker extra (pip install 'safety-classifier[worker]'); "
                        f"this server cannot import {e.name!r}. Classify and Info work without it"
                    ) from None
            return self._client

    async def client(self) -> JobClient:
        return self._client or await self._run(self._make_client)

    async def submit(self, request: Any) -> Any:
        check_job_size(len(request.items), self.max_items)  # before a dict and a line is made of each item
        items = job_items_from_proto(request)  # role errors before any Redis call
        client = await self.client()
        # Another submit of the job id holding its submit lease: JOB_BUSY at once, with the lease's remaining
        # time as the retry hint. Waiting for it (up to ~32 s) would hold a pool thread past the caller's
        # deadline, and a few such calls would hold them all (every job RPC would wait behind them).
        submitted = await self._run(
            lambda: client.submit(items, job_id=request.job_id or None, lease_wait_s=0)
        )
        status = submitted.status
        log.info(
            "job submitted",
            extra={"job_id": status.job_id, "items": status.total, "resumed": submitted.resumed},
        )
        return pb2.SubmitJobResponse(
            job_id=status.job_id,
            total=status.total,
            chunks=status.chunks,
            resumed=submitted.resumed,
            job=job_to_proto(status),
        )

    async def get(self, request: Any) -> Any:
        client = await self.client()
        return job_to_proto(await self._run(client.status, request.job_id))

    async def cancel(self, request: Any) -> Any:
        client = await self.client()
        status = await self._run(client.cancel, request.job_id)
        log.info("job cancelled", extra={"job_id": status.job_id, "state": status.state})
        return job_to_proto(status)

    async def delete(self, request: Any) -> Any:
        client = await self.client()
        status = await self._run(client.delete, request.job_id)
        log.info("job deleted", extra={"job_id": status.job_id, "state": status.state})
        return job_to_proto(status)

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        """JobResults in item order from `start_index`; see StreamJobResultsRequest.wait."""
        client = await self.client()
        job_id = request.job_id
        status = await self._run(client.status, job_id)
        total, index = status.total, request.start_index
        if not 0 <= index <= total:
            raise InvalidInputError(f"{index} is not in [0, {total}], the job's items", field="start_index")
        thresholds = self.thresholds(status.model) if status.model else None
        saw_finished = False  # a read that began after the job was seen finished must find every result
        while index < total:
            if self.draining():
                sent = index - request.start_index
                raise ShuttingDownError(
                    f"server is draining: this stream sent {sent} results; resume with start_index {index} "
                    "on another replica"
                )
            lines, gap = await self._run(_page, client, job_id, index)
            if lines and thresholds is None:  # the model is known once the first chunk is written
                model = gap.model if gap is not None else (await self._run(client.status, job_id)).model
                thresholds = self.thresholds(model or "")
            for line in lines:
                yield job_result_to_proto(line, thresholds)
            index += len(lines)
            if gap is None:  # a full page, or the end
                continue
            if gap.finished:
                if saw_finished:
                    raise NotFoundError(f"job {job_id!r}: result {index} is missing (expired or lost)")
                saw_finished = True  # it finished after our read: read again at once
                continue
            if not request.wait:
                return
            await self._run(client.check_submission, job_id, gap)  # a submit that stopped: never finishes
            await asyncio.sleep(POLL_S)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _page(client: JobClient, job_id: str, start: int) -> tuple[list[dict[str, Any]], JobStatus | None]:
    """Up to PAGE result lines from `start` that exist now, and the job's status read after the first item
    without a result (None when the page filled up or the job's last line was read)."""
    lines: list[dict[str, Any]] = []
    try:
        for line in client.results(job_id, start=start, timeout=0):
            lines.append(line)
            if len(lines) >= PAGE:
                break
        return lines, None
    except DeadlineExceededError:  # timeout=0: the next result is not written yet
        return lines, client.status(job_id)


__all__ = ["JobService", "default_job_client", "job_items_from_proto", "job_to_proto"]
