"""The `safety.v1.SafetyClassifier` servicer: parse -> validate -> submit -> map. Nothing else.

Owns: protobuf <-> engine conversion (`items_from_proto`, `response_from_outcome`, `info_response`), the
request-level limits (item count, text size), and ClassifyStream's ordering, in-flight bound and per-request
errors (the status, message and details of each from service/errors.py's `describe`). Validation of the
items themselves and of thresholds is the engine's (`coerce_items`, `resolve_thresholds`); batching is the
scheduler's; the job RPCs are delegated to service/jobs.py; status codes and error details are
service/errors.py's (handlers just raise `SafetyError`s).
Must not know: threads, torch, prometheus, Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import grpc

from model import Classifier, Item
from model.errors import InvalidInputError, ModelLoadingError, ShuttingDownError, UnavailableError
from model.items import check_length, item_id
from service.decoding import check_decoded
from service.errors import call_deadline, describe, final_code
from service.jobs import JobClientFactory, JobService, default_job_client
from service.scheduler import Outcome, Scheduler
from service.settings import ServeSettings
from service.stubs import pb2, pb2_grpc

log = logging.getLogger("safety.service")

ROLES = {pb2.ROLE_UNSPECIFIED: "prompt", pb2.ROLE_PROMPT: "prompt", pb2.ROLE_RESPONSE: "response"}


class ClassifiedObserver:
    """What the servicer reports per successful Classify (the Metrics object satisfies it)."""

    def classified(self, items: int, tokens: int, flagged: int) -> None:
        pass

    def stream_request(self, code: str, seconds: float) -> None:
        """One request of a ClassifyStream answered, with the status its StreamError names ("OK": none); or
        left unanswered by a stream that ended first, with the stream's code."""


def items_from_proto(request: Any, max_items: int, max_text_chars: int) -> list[Item]:
    """ClassifyRequest.items -> engine Items, enforcing the request-level limits."""
    n = len(request.items)
    if n == 0:
        raise InvalidInputError("at least one item is required", field="items")
    if n > max_items:
        raise InvalidInputError(
            f"{n} items, more than the limit of {max_items} per request (SAFETY_MAX_ITEMS); split it or use "
            "a batch job",
            field="items",
            limit=max_items,
            value=n,
            setting="SAFETY_MAX_ITEMS",
        )
    items = []
    for i, it in enumerate(request.items):
        check_length(it.text, i, "text", max_text_chars)
        check_length(it.context, i, "context", max_text_chars)
        role = ROLES.get(it.role)
        if role is None:
            raise InvalidInputError(
                f"unknown role {it.role}; use ROLE_PROMPT or ROLE_RESPONSE", index=i, field="role"
            )
        items.append(Item(text=it.text, role=role, context=it.context or None, id=item_id(it.id, i)))
    return items


def response_from_outcome(
    outcome: Outcome,
    labels: list[str],
    thresholds: Mapping[str, float],
    raw_scores: bool,
    model: str,
    revision: str = "",
) -> Any:
    """Results -> ClassifyResponse, filled in place (`add()` and field stores): about a third of the time of
    building every LabelScore and Span with keyword constructors, which showed as the largest share of the
    event loop's GIL time at a few thousand items a second."""
    response = pb2.ClassifyResponse(
        model=model,
        model_revision=revision,
        timing=pb2.Timing(
            tokenize_ms=outcome.tokenize_s * 1e3,
            queue_ms=outcome.queue_s * 1e3,
            inference_ms=outcome.inference_s * 1e3,
        ),
    )
    for r in outcome.results:
        res = response.results.add(id=r.id or "", flagged=r.flagged, tokens=r.tokens, windows=r.windows)
        res.flagged_labels.extend(r.flagged_labels)
        flagged = set(r.flagged_labels)
        chosen = r.logits if raw_scores else r.scores
        for label in labels:
            ls = res.scores.add(
                label=label,
                score=chosen[label],
                flagged=label in flagged,
                threshold=thresholds[label],
                logit=r.logits[label],
            )
            ls.span.start, ls.span.end = r.spans[label]
    return response


def info_response(clf: Classifier, settings: ServeSettings, scheduler: Scheduler) -> Any:
    info = clf.info()
    lim = clf.limits
    return pb2.InfoResponse(
        model=info["name"],
        labels=info["labels"],
        thresholds=info["thresholds"],
        limits=pb2.Limits(
            max_items=settings.max_items,
            max_text_chars=settings.max_text_chars,
            max_tokens=lim.max_tokens,
            window_overlap=lim.window_overlap,
            max_context_tokens=lim.max_context_tokens,
            max_batch_tokens=lim.max_batch_tokens,
            max_batch_sequences=lim.max_batch_sequences,
            max_wait_ms=settings.max_wait_ms,
            deadline_horizon_ms=settings.deadline_horizon_ms,
            max_queue_tokens=scheduler.max_queue_tokens,
            max_queue_items=scheduler.max_queue_items,
            max_message_bytes=settings.max_message_bytes,
            max_stream_inflight=settings.max_stream_inflight,
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            max_job_items=settings.max_job_items,
        ),
        device=info["device"],
        dtype=info["dtype"],
        backend=info["backend"],
        version=info["version"],
        multi_label=info["multi_label"],
        compiled=info["compiled"],
        cuda_graphs=info["cuda_graphs"],
        fused_gemm=info["fused_gemm"],
        budget=info["budget"],
        model_revision=info["revision"],
    )


class SafetyServicer(pb2_grpc.SafetyClassifierServicer):
    def __init__(
        self,
        settings: ServeSettings,
        observer: ClassifiedObserver | None = None,
        job_client: JobClientFactory | None = None,
    ) -> None:
        """`job_client`: makes the job RPCs' `worker.jobs.JobClient` on first use (default: from the
        `SAFETY_*` environment, see service/jobs.py)."""
        self.settings = settings
        self.observer = observer or ClassifiedObserver()
        self.jobs = JobService(
            job_client or default_job_client(settings),
            self.job_thresholds,
            draining=lambda: self.draining,
            max_items=settings.max_job_items,
        )
        self.clf: Classifier | None = None
        self.scheduler: Scheduler | None = None
        self.draining = False
        self.active = 0  # Classify calls, ClassifyStream requests and job RPCs in flight
        self.idle = asyncio.Event()  # set while nothing is in flight
        self.idle.set()
        self._stream_readers: set[asyncio.Task[None]] = set()  # one per open ClassifyStream

    def attach(self, clf: Classifier, scheduler: Scheduler) -> None:
        self.clf, self.scheduler = clf, scheduler

    def _drain_refusal(self) -> UnavailableError:
        """Why a call is refused while draining: the device that failed for good (DEVICE_FAILED, the replica
        is being replaced), else the drain (SHUTTING_DOWN)."""
        if self.scheduler is not None and self.scheduler.device_error is not None:
            return self.scheduler.refusal()
        return ShuttingDownError("server is draining; retry on another replica")

    def _ready(self) -> tuple[Classifier, Scheduler]:
        if self.draining:
            raise self._drain_refusal()
        if self.clf is None or self.scheduler is None:
            raise ModelLoadingError("model is still loading; retry shortly")
        return self.clf, self.scheduler

    def start_draining(self) -> None:
        """New calls get UNAVAILABLE; open ClassifyStreams stop reading, send the responses they owe and end
        with UNAVAILABLE (their clients resend the rest elsewhere)."""
        self.draining = True
        for reader in list(self._stream_readers):
            reader.cancel()

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Count a request as in flight: the drain waits for `idle`."""
        self.active += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        clf, scheduler = self._ready()
        with self._in_flight():
            return await self._classify(clf, scheduler, request, context, start)

    async def ClassifyStream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Each request read is classified at once as its own task (up to `max_stream_inflight` at a time);
        the responses go out in request order. A failed request becomes a StreamError message; the stream
        ends with a status only when the model is not ready, after a drain stopped its reading, or when
        reading the next request raised (an API key revoked on the open stream, service/server.py): then too
        after the responses owed for the requests read before. Each
        request started is reported to the observer once: with its answer's status or, when the stream ends
        before answering it (the client cancelled, the deadline passed), with the stream's final code. (A
        request read while max_stream_inflight were unanswered waits at the window, not started: a stream
        that ends then leaves it uncounted, as it does the requests it never read.)"""
        clf, scheduler = self._ready()
        window = asyncio.Semaphore(self.settings.max_stream_inflight)
        order: asyncio.Queue[tuple[asyncio.Task[Any], float] | None] = asyncio.Queue()  # (task, read at)
        drained = False

        async def classify(request: Any, start: float) -> Any:
            with self._in_flight():  # a request that did not parse is its own StreamError (service.decoding)
                return await self._classify(clf, scheduler, check_decoded(request), context, start)

        async def read() -> None:
            nonlocal drained
            try:
                async for request in requests:
                    await window.acquire()  # max_stream_inflight unanswered: flow control does the rest
                    if self.draining:
                        drained = True
                        return
                    start = time.perf_counter()
                    order.put_nowait((asyncio.create_task(classify(request, start)), start))
            except asyncio.CancelledError:  # start_draining: stop reading, answer what was read
                drained = True
            finally:
                order.put_nowait(None)

        reader = asyncio.create_task(read())
        self._stream_readers.add(reader)
        deadline = call_deadline(context)
        sequence = 0
        answering: tuple[asyncio.Task[Any], float] | None = None  # read, its answer not counted yet
        try:
            while (entry := await order.get()) is not None:
                answering = entry
                message = await self._stream_message(*entry, sequence)
                answering = None
                yield message
                window.release()
                sequence += 1
            await reader
        finally:
            self._stream_readers.discard(reader)
            reader.cancel()
            cut = [answering] if answering is not None else []
            while not order.empty():
                if (entry := order.get_nowait()) is not None:
                    cut.append(entry)
            if cut:  # the stream ended before answering these (cancelled, out of time): they end with it
                code = final_code(context, deadline)
                for task, start in cut:
                    task.cancel()
                    self.observer.stream_request(code, time.perf_counter() - start)
        if drained:
            rest = f"the ones after sequence {sequence - 1}" if sequence else "all of them"
            raise ShuttingDownError(
                f"server is draining: {sequence} requests of this stream were answered; send {rest} to "
                "another replica"
            )

    async def _stream_message(self, task: asyncio.Task[Any], start: float, sequence: int) -> Any:
        """A ClassifyStreamResponse: the request's response, or the error Classify would have answered.
        `start`: when the request was read (time.perf_counter()), where its latency counts from."""
        try:
            response = await task
        except Exception as exc:
            details = describe(exc)
            code = details.code
            self.observer.stream_request(code.name, time.perf_counter() - start)
            error = pb2.StreamError(
                code=code.value[0],
                status=code.name,
                message=details.message,
                field=details.field,
                reason=details.reason,
                retry_after_ms=details.retry_after_ms or 0,
                metadata=details.metadata,
            )
            return pb2.ClassifyStreamResponse(sequence=sequence, error=error)
        self.observer.stream_request("OK", response.timing.total_ms / 1e3)
        return pb2.ClassifyStreamResponse(sequence=sequence, response=response)

    async def _classify(
        self,
        clf: Classifier,
        scheduler: Scheduler,
        request: Any,
        context: grpc.aio.ServicerContext,
        start: float,
    ) -> Any:
        items = clf.coerce_items(
            items_from_proto(request, self.settings.max_items, self.settings.max_text_chars)
        )
        thresholds = clf.resolve_thresholds(dict(request.thresholds))
        outcome = await scheduler.submit(items, thresholds, call_deadline(context))
        response = response_from_outcome(
            outcome, clf.labels, thresholds, request.raw_scores, clf.name, clf.revision
        )
        response.timing.total_ms = (time.perf_counter() - start) * 1e3
        tokens, flagged = sum(r.tokens for r in outcome.results), sum(r.flagged for r in outcome.results)
        self.observer.classified(len(items), tokens, flagged)
        log.debug(
            "classified",
            extra={"items": len(items), "tokens": tokens, "flagged": flagged, "ms": response.timing.total_ms},
        )
        return response

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        clf, scheduler = self._ready()
        return info_response(clf, self.settings, scheduler)

    # ---- batch jobs (service/jobs.py): they need Redis, not the model -----------------------------------
    def job_thresholds(self, model: str) -> dict[str, float]:
        """The default thresholds to report in JobResults of a job classified by `model` ({}: unknown)."""
        clf = self.clf
        return dict(clf.thresholds) if clf is not None and clf.name == model else {}

    def _jobs(self) -> JobService:
        if self.draining:
            raise self._drain_refusal()
        return self.jobs

    async def SubmitJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        jobs = self._jobs()
        with self._in_flight():
            return await jobs.submit(request)

    async def GetJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        jobs = self._jobs()
        with self._in_flight():
            return await jobs.get(request)

    async def CancelJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        jobs = self._jobs()
        with self._in_flight():
            return await jobs.cancel(request)

    async def DeleteJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        jobs = self._jobs()
        with self._in_flight():
            return await jobs.delete(request)

    async def StreamJobResults(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """In flight until it ends; a drain ends it at its next page or poll with UNAVAILABLE and the
        start_index to resume from (service/jobs.py)."""
        jobs = self._jobs()
        with self._in_flight():
            async for result in jobs.stream(request):
                yield result
