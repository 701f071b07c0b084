"""Dynamic batching: one queue of token windows from concurrent requests, one batch former, one runner.

Owns: admission (bounds on queued items and tokens -> `OverloadedError` at once, whose `retry_after_ms` is
the time the device needs to free room for the call at its recent seconds per token; the tokens of calls
still being tokenized count: estimated from their characters at the recent tokens per character, then
corrected piece by piece to their real count), tokenization off the event loop (a thread pool running
`clf.encode` on pieces of a call's items, which stops between pieces when the caller is gone, the
server closes, or the call has passed `max_call_tokens`, the most one call may queue: the token bound or,
when larger, the most one item within the front end's `max_text_chars` can make; a call above the bound
joins a queue below it and takes it over the bound for a while), the pending queue, batch formation with the
engine's planner (`model.planner.next_batch`: the most urgent window plus its nearest neighbours in length
under the token budget, or less, to end well before that window's deadline, urgency being
`model.planner.due`: earliest deadline first, a deadline counting at most `deadline_horizon_ms` after the
call was queued and a call without one exactly that, so a prompt with a short deadline is not stuck behind
an earlier bulk call, and no call starves; an idle device waits at most
`max_wait_ms` for a fuller batch, and only while other calls are still being tokenized; a busy device lets
the queue fill meanwhile), the runner thread (`clf.launch`: pack and queue a batch on the device, while the
former prepares the next), the collector thread (`clf.collect`: wait for a batch's logits and deliver its
finished requests, so the runner can queue the next batch on the device before the previous one is read
back: two batches in flight on CUDA, one on the CPU), dropping windows of cancelled or expired requests
before compute, and reassembling per-request results with `clf.aggregate`.

Threads: the event loop calls `submit`; the former, the runner and (with two batches in flight) the collector
are daemon threads sharing one condition variable (runner -> collector through a queue); results go back to
the loop with `call_soon_threadsafe`. Must not know: gRPC, protobuf, prometheus (metrics arrive through the
`SchedulerMetrics` protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from model import Classifier, Encoded, Item, Result, Rows
from model.errors import (
    DeadlineExceededError,
    DeviceFailedError,
    InvalidInputError,
    OverloadedError,
    ShuttingDownError,
    UnavailableError,
    device_failed,
)
from model.planner import due, most_urgent, next_batch
from model.runner import Launched
from model.threads import name_os_thread
from service.deadlines import deadline_passed

log = logging.getLogger("safety.service.scheduler")

PIECE_CHARS = 262_144  # tokenized at a time (~0.1 s on one core): how soon a stop or the bound is seen
# Admission estimates a call being tokenized at `chars x ratio` tokens. The ratio starts at TOKENS_PER_CHAR
# and then follows the window tokens per character of the calls tokenized since: a moving average over calls
# in which a call's weight grows with its characters up to RATIO_WEIGHT at RATIO_CHARS. So no single call,
# however large or unusual (90,000 CJK characters at ~3.4 tokens each, against ~0.25 for English), moves the
# ratio more than RATIO_WEIGHT of the way, and each later call of RATIO_CHARS or more takes back RATIO_WEIGHT
# of what is left (0.8^20: ~1% after twenty); short prompts, whose special tokens weigh heavily per
# character, barely move it. The cumulative ratio used before let one such call inflate every later estimate
# for the process's life. Once a call's first pieces are tokenized, its own ratio estimates its rest.
TOKENS_PER_CHAR = 0.25  # the ratio before any call has been tokenized
RATIO_WEIGHT, RATIO_CHARS = 0.2, 4096
# An OverloadedError's retry hint (the front end sends it on): the time the device needs to free room for the
# refused call at its recent rate, within these bounds (a retry sooner than 50 ms finds the same queue; one
# later than 5 s had better go elsewhere), and 100 ms before any batch has measured the rate.
RETRY_MIN_MS, RETRY_MAX_MS, RETRY_DEFAULT_MS = 50, 5000, 100
RATE_WEIGHT = 0.2  # of the last batch in the moving average of device seconds per token
# A batch formed around a window whose call has a deadline is cut to what the device computes, at its recent
# rate, in URGENT_SHARE of the time from when the batches already on it are done to that deadline: a prompt
# behind a bulk call waits for the batches on the device and then a batch of its own size, not a full token
# budget of the bulk call's windows (its length neighbours when packed: ~0.1 s of an H100, more on a slower
# device; padded, the waste bound keeps them apart anyway). Never below max_batch_tokens / URGENT_FLOOR,
# where a smaller batch would waste the device more than it saves.
URGENT_SHARE, URGENT_FLOOR = 0.5, 8
# Why queued windows are dropped before compute: SchedulerMetrics.drop's `reason`, the label values of
# safety_dropped_windows_total (each exported from start-up, at 0, so that Prometheus' increase() and rate()
# see a drop from the first one on).
DROP_CANCELLED, DROP_DEADLINE, DROP_SHUTDOWN, DROP_BATCH_FAILED, DROP_DEVICE_FAILED = (
    "cancelled", "deadline", "shutdown", "batch_failed", "device_failed"
)  # fmt: skip
DROP_REASONS = (DROP_CANCELLED, DROP_DEADLINE, DROP_SHUTDOWN, DROP_BATCH_FAILED, DROP_DEVICE_FAILED)


class _Stopped(Exception):
    """Tokenization stopped between pieces: the caller is gone (its own error is already on its way)."""


class SchedulerMetrics(Protocol):
    def queue_bounds(self, items: int, tokens: int) -> None: ...
    def queue_depth(self, items: int, tokens: int) -> None: ...
    def tokenized(self, seconds: float) -> None: ...
    def batch(
        self, sequences: int, tokens: int, seconds: float, waits: list[float], graphed: bool
    ) -> None: ...
    def drop(self, reason: str, windows: int) -> None: ...


class _NoMetrics:
    def queue_bounds(self, items: int, tokens: int) -> None:
        pass

    def queue_depth(self, items: int, tokens: int) -> None:
        pass

    def tokenized(self, seconds: float) -> None:
        pass

    def batch(self, sequences: int, tokens: int, seconds: float, waits: list[float], graphed: bool) -> None:
        pass

    def drop(self, reason: str, windows: int) -> None:
        pass


@dataclass
class Outcome:
    """What `submit` returns: results in item order, and where the time went."""

    results: list[Result]
    tokenize_s: float
    queue_s: float  # longest wait of any of the request's windows
    inference_s: float  # device time of the distinct batches the request ran in (Launched.device_seconds)


@dataclass(eq=False)
class _Request:
    encoded: list[Encoded]
    thresholds: dict[str, float]
    deadline: float | None  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Outcome]
    tokenize_s: float
    window_rows: list[list[tuple[list[float], list[float]] | None]]  # per item, per window: (logits, probs)
    remaining: int  # windows not computed yet
    queued_windows: list[int]  # per item: windows still in the queue (admission counts the item until 0)
    done: bool = False  # resolved, failed, cancelled or expired: its windows are skipped
    queue_s: float = 0.0
    batch_seconds: dict[int, float] = field(default_factory=dict)


@dataclass(eq=False)
class _Admission:
    """What an admitted call holds from admission until its windows join the queue or it fails: `items`, and
    `reserved`, the tokens admission counts for it meanwhile: an estimate from its characters, then, as its
    pieces are tokenized, their real tokens plus an estimate of the rest. Changed under the scheduler's
    lock."""

    items: int
    reserved: int


@dataclass(eq=False)
class _Launched:
    """A batch handed to the device by the runner and read back by the collector."""

    batch: list[_Window]
    batch_id: int
    waits: list[float]
    tokens: int
    handle: Launched | None  # on the device, maybe still being computed; None when the launch failed
    error: Exception | None = None


@dataclass(eq=False)
class _Window:
    req: _Request
    item: int
    index: int
    ids: list[int]
    enqueued: float
    priority: float  # `model.planner.due`: the former takes the smallest first
    length: int  # len(ids): the former reads it for every queued window each batch


class Scheduler:
    def __init__(
        self,
        clf: Classifier,
        *,
        max_wait_ms: float = 2.0,
        deadline_horizon_ms: float = 10_000.0,
        max_queue_tokens: int | None = None,
        max_queue_items: int = 4096,
        max_text_chars: int | None = None,
        encode_threads: int = 2,
        metrics: SchedulerMetrics | None = None,
        in_flight: int | None = None,
        on_device_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """`max_queue_tokens`: the admission bound on queued tokens (unset: 32 x max_batch_tokens).
        `max_text_chars`: the front end's limit on a text (and a context), when it has one: one call may
        queue up to `max_call_tokens`, the larger of the bound and the most tokens one such item can make at
        worst (`clf.most_tokens`), so that no item the front end accepts is larger than what a call may
        queue; a call above the bound is queued while the queue is below it (`_enqueue`).
        `on_device_failure(exc)`: called once, from a scheduler thread, when a batch fails with an error
        that broke the device for good (`model.errors.device_failed`); by then every queued call has failed
        with UnavailableError and no new one is admitted."""
        self.clf = clf
        self.on_device_failure = on_device_failure
        self.device_error: BaseException | None = None  # set once the device failed for good
        self.max_wait_s = max_wait_ms / 1000.0
        self.deadline_horizon_s = deadline_horizon_ms / 1000.0
        self.max_batch_tokens = clf.limits.max_batch_tokens
        self.max_batch_sequences = clf.limits.max_batch_sequences
        self.max_queue_tokens = max_queue_tokens or 32 * self.max_batch_tokens
        self.max_text_chars = max_text_chars
        largest = clf.most_tokens(max_text_chars) if max_text_chars else 0  # one item, at worst
        self.max_call_tokens = max(self.max_queue_tokens, largest)
        self.max_queue_items = max_queue_items
        self.padded = clf.padded
        self.metrics: SchedulerMetrics = metrics or _NoMetrics()
        self._pool = ThreadPoolExecutor(
            max_workers=encode_threads, thread_name_prefix="safety-encode", initializer=name_os_thread
        )
        self._cond = threading.Condition()
        self._pending: list[_Window] = []  # arrival order: index 0 is the oldest
        self._slot: list[_Window] | None = None  # the next batch, formed while the runner computes
        self._queued_items = 0  # admitted items not yet handed to the runner (tokenizing included)
        self._tokenizing = 0  # admitted items still being tokenized: they will join the queue shortly
        self._reserved_tokens = 0  # tokens of calls being tokenized (partly estimated): admission counts them
        self._ratio = TOKENS_PER_CHAR  # window tokens per character of recent calls (moving average)
        self._seconds_per_token: float | None = None  # of recent batches (moving average): the drain rate
        # when the batches handed to the runner will be done (estimated at each launch, monotonic)
        self._device_free_at = 0.0
        # Heap of (deadline, tie-breaker, weak reference to the request): finished requests are not kept.
        self._deadlines: list[tuple[float, int, weakref.ref[_Request]]] = []
        self._sequence = 0  # tie-breaker for the heap
        self._queued_tokens = 0
        self._pending_tokens = 0
        self._runner_idle = False
        self._closing = False
        self._accepting = True
        self._held = False  # test hook (hold_runner): the runner takes no new batch while set
        self._batch_counter = 0
        self.batches_run = 0
        self.sequences_run = 0
        # Batches launched and not yet read back. CUDA: two (one computing, one queued behind it), so the
        # device never waits for the host to read results and launch the next batch. CPU: one, read back by
        # the runner itself: a CPU launch computes at once, so there is nothing to overlap (bench/e2e.py on
        # 2 cores: gRPC / engine 0.62-0.83 in nine runs through the collector, 0.76-1.01 in nine inline).
        self.in_flight = in_flight or (2 if clf.asynchronous else 1)
        self._in_flight = threading.Semaphore(self.in_flight)
        self._launched: queue.SimpleQueue[_Launched | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._form_loop, name="safety-batcher", daemon=True),
            threading.Thread(target=self._run_loop, name="safety-runner", daemon=True),
        ]
        if self.in_flight > 1:  # with one batch in flight the runner reads it back itself
            self._threads.append(
                threading.Thread(target=self._collect_loop, name="safety-collector", daemon=True)
            )
        for t in self._threads:
            t.start()
        self.metrics.queue_bounds(self.max_queue_items, self.max_queue_tokens)

    # ---- event-loop side ------------------------------------------------------------------------------
    async def submit(
        self, items: Sequence[Item], thresholds: Mapping[str, float], deadline: float | None = None
    ) -> Outcome:
        """Tokenize, admit, queue and await the results of validated items (in item order).

        Raises OverloadedError (queue bound), UnavailableError (closing), DeadlineExceededError,
        InvalidInputError (a request with more items than the whole queue bound, or more tokens than
        `max_call_tokens`)."""
        n = len(items)
        if not n:
            return Outcome([], 0.0, 0.0, 0.0)
        chars = [len(it.text) + len(it.context or "") for it in items]
        admission = self._admit_items(n, sum(chars))
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        # in a copy of the call's context: a line logged while tokenizing carries the call's request id
        job = self._pool.submit(
            contextvars.copy_context().run, self._encode, list(items), chars, stop, admission
        )
        try:
            start = time.perf_counter()
            encoded, tokens = await asyncio.wrap_future(job)
            tokenize_s = time.perf_counter() - start
            self.metrics.tokenized(tokenize_s)
            req = _Request(
                encoded=encoded,
                thresholds=dict(thresholds),
                deadline=deadline,
                loop=loop,
                future=loop.create_future(),
                tokenize_s=tokenize_s,
                window_rows=[[None] * len(e.windows) for e in encoded],
                remaining=sum(len(e.windows) for e in encoded),
                queued_windows=[len(e.windows) for e in encoded],
            )
            self._enqueue(req, tokens, admission)
        except BaseException:
            # a piece being tokenized still holds its admission: released when it ends (at once when none)
            stop.set()
            job.add_done_callback(lambda _: self._release(admission))
            raise
        try:
            return await req.future
        except asyncio.CancelledError:
            self._abandon(
                req, DROP_DEADLINE if deadline_passed(req.deadline, time.monotonic()) else DROP_CANCELLED
            )
            raise

    def _admit_items(self, n: int, chars: int) -> _Admission:
        """Admit `n` items of `chars` characters, or refuse at once; the admission holds the items and the
        tokens reserved for them until they are queued (first an estimate at the recent tokens per
        character, `self._ratio`)."""
        if n > self.max_queue_items:
            raise InvalidInputError(
                f"{n} items, more than the server's whole queue bound of {self.max_queue_items} "
                "(SAFETY_MAX_QUEUE_ITEMS); split it or use a batch job",
                field="items",
                limit=self.max_queue_items,
                value=n,
                setting="SAFETY_MAX_QUEUE_ITEMS",
            )
        with self._cond:
            if not self._accepting:
                raise self.refusal()
            tokens = self._queued_tokens + self._reserved_tokens  # queued, and on their way to the queue
            items_over = self._queued_items + n - self.max_queue_items
            if items_over > 0 or tokens >= self.max_queue_tokens:
                per_item = tokens / self._queued_items if self._queued_items else 0.0
                over = max(items_over * per_item, tokens - self.max_queue_tokens + 1)
                raise OverloadedError(
                    f"queue full ({self._queued_items} items, {self._queued_tokens} tokens queued and about "
                    f"{self._reserved_tokens} being tokenized; bounds {self.max_queue_items} items, "
                    f"{self.max_queue_tokens} tokens); retry with backoff",
                    retry_after_ms=self._retry_ms_locked(over),
                )
            admission = _Admission(n, self._estimate(chars, self._ratio))
            self._queued_items += n
            self._tokenizing += n
            self._reserved_tokens += admission.reserved
            self._report_depth_locked()
            return admission

    def _estimate(self, chars: int, ratio: float) -> int:
        """Tokens estimated for `chars` characters not tokenized yet, at `ratio` tokens per character. At
        most a quarter of the bound: a call estimated past the whole bound is most likely refused after its
        first pieces, and must not shut every other call out meanwhile."""
        return min(round(chars * ratio), self.max_queue_tokens // 4)

    def _retry_ms_locked(self, over_tokens: float) -> int:
        """The retry hint of a refusal: how long the device needs to run the `over_tokens` that must leave the
        queue before the refused call fits, at the recent device seconds per token (RETRY_DEFAULT_MS before
        the first batch), clamped to [RETRY_MIN_MS, RETRY_MAX_MS]."""
        if self._seconds_per_token is None:
            return RETRY_DEFAULT_MS
        ms = 1000 * self._seconds_per_token * over_tokens
        return int(min(RETRY_MAX_MS, max(RETRY_MIN_MS, ms)))

    def _release(self, admission: _Admission) -> None:
        """A call admitted but not queued is gone: its items and reserved tokens no longer count."""
        with self._cond:
            self._queued_items -= admission.items
            self._tokenizing -= admission.items
            self._reserved_tokens -= admission.reserved
            self._report_depth_locked()
            self._cond.notify_all()

    def _encode(
        self, items: list[Item], chars: list[int], stop: threading.Event, admission: _Admission
    ) -> tuple[list[Encoded], int]:
        """(the call's windows, their tokens): `clf.encode` on a piece of at most PIECE_CHARS characters at a
        time (a longer item alone), in an encode thread; between pieces, stop when the caller is gone or the
        server closes, and refuse a call already past `max_call_tokens` instead of tokenizing the rest.
        After each piece, the call's reservation becomes its real tokens so far plus its other characters at
        its own tokens per character so far: it converges to the real count as the pieces go."""
        out: list[Encoded] = []
        tokens = start = done_chars = 0
        total_chars = sum(chars)
        while start < len(items):
            end, size = start + 1, chars[start]
            while end < len(items) and size + chars[end] <= PIECE_CHARS:
                size += chars[end]
                end += 1
            if stop.is_set():
                raise _Stopped
            if self._closing:
                raise self.refusal()
            piece = self.clf.encode(items[start:end])
            out += piece
            for i, enc in enumerate(piece, start):
                made = sum(len(w) for w in enc.windows)
                if made > self.max_call_tokens:  # this item alone: say which, and what it made
                    raise InvalidInputError(
                        f"makes {made} tokens ({len(enc.windows)} windows), more than {self._call_bound()}; "
                        "send a shorter text, or use a batch job",
                        index=i,
                        field="text",
                    )
                tokens += made
            if tokens > self.max_call_tokens:
                raise InvalidInputError(
                    f"the request has more than {tokens} tokens (its first {end} items), more than "
                    f"{self._call_bound()}; send fewer or shorter items, or use a batch job",
                    field="items",
                )
            start = end
            done_chars += size
            with self._cond:
                own = tokens / done_chars if done_chars else self._ratio  # this call's ratio so far
                reserved = tokens + self._estimate(total_chars - done_chars, own)
                self._reserved_tokens += reserved - admission.reserved
                admission.reserved = reserved
                self._report_depth_locked()
        if total_chars:
            with self._cond:  # the moving ratio, for the next estimates (see RATIO_WEIGHT)
                weight = RATIO_WEIGHT * min(1.0, total_chars / RATIO_CHARS)
                self._ratio += weight * (tokens / total_chars - self._ratio)
        return out, tokens

    def _call_bound(self) -> str:
        """`max_call_tokens` in words, for the refusal of a call (or an item) larger than it."""
        bound = f"the server's whole queue bound of {self.max_queue_tokens} (SAFETY_MAX_QUEUE_TOKENS)"
        if self.max_call_tokens == self.max_queue_tokens:
            return bound
        return (
            f"the {self.max_call_tokens} tokens one call may queue (the most one item of "
            f"SAFETY_MAX_TEXT_CHARS={self.max_text_chars} characters can make; {bound})"
        )

    def _enqueue(self, req: _Request, tokens: int, admission: _Admission) -> None:
        """Queue the windows of a tokenized call (`tokens` in all), which held `admission` until now.

        A call within the token bound must fit under it (else OverloadedError: it fits once the queue has
        drained by the excess). A call above the bound (up to `max_call_tokens`: one item as large as the
        front end accepts) never fits, so it needs what admission needs: a queue below the bound. It then
        takes the queue over the bound, and admission refuses later calls until the device has worked the
        queue back below it: the queue never holds `max_queue_tokens + max_call_tokens` tokens."""
        now = time.monotonic()
        if req.deadline is not None and now >= req.deadline:
            raise DeadlineExceededError("deadline passed during tokenization")
        with self._cond:
            if not self._accepting:
                raise self.refusal()
            room = self.max_queue_tokens - self._queued_tokens
            if tokens <= self.max_queue_tokens and tokens > room:
                raise OverloadedError(
                    f"queue full ({self._queued_tokens} + {tokens} tokens over the bound of "
                    f"{self.max_queue_tokens}); retry with backoff",
                    retry_after_ms=self._retry_ms_locked(tokens - room),
                )
            if tokens > self.max_queue_tokens and room <= 0:
                raise OverloadedError(
                    f"queue full ({self._queued_tokens} tokens queued, the bound is {self.max_queue_tokens}; "
                    f"this call's {tokens} tokens are queued only while the queue is below it); retry with "
                    "backoff",
                    retry_after_ms=self._retry_ms_locked(1 - room),
                )
            for i, enc in enumerate(req.encoded):
                if not enc.windows:
                    raise InvalidInputError("produced no tokens", index=i, field="text")
            priority = due(now, req.deadline, self.deadline_horizon_s)
            if self._slot and priority < min([w.priority for w in self._slot]):
                self._unform_locked()  # formed before this more urgent call arrived: formed again with it
            for i, enc in enumerate(req.encoded):
                for k, ids in enumerate(enc.windows):
                    self._pending.append(_Window(req, i, k, ids, now, priority, len(ids)))
            self._queued_tokens += tokens
            self._pending_tokens += tokens
            self._tokenizing -= admission.items
            self._reserved_tokens -= admission.reserved
            if req.deadline is not None:
                self._sequence += 1
                heapq.heappush(self._deadlines, (req.deadline, self._sequence, weakref.ref(req)))
            self._report_depth_locked()
            self._cond.notify_all()

    def _abandon(self, req: _Request, reason: str) -> None:
        """The caller is gone: take its windows out of the queue now."""
        with self._cond:
            if req.done:
                return
            req.done = True
            self._drop_locked(lambda w: w.req is req, reason)

    # ---- shared, under self._cond ---------------------------------------------------------------------
    def _fail_locked(self, reqs: set[_Request], exc: BaseException, reason: str) -> None:
        """Complete `reqs` with `exc` (those not done yet) and drop their queued windows."""
        for req in reqs:
            if not req.done:
                req.done = True
                _resolve(req, exc)
        self._drop_locked(lambda w: w.req in reqs, reason)

    def _drop_locked(self, dead: Callable[[_Window], bool], reason: str) -> list[_Window]:
        keep, gone = [], []
        for w in self._pending:
            (gone if dead(w) else keep).append(w)
        if gone:
            self._pending = keep
            self._dequeued_locked(gone)
            self.metrics.drop(reason, len(gone))
            log.debug("dropped %d queued windows (%s)", len(gone), reason)
        return gone

    def _dequeued_locked(self, windows: list[_Window], *, in_slot: bool = False) -> None:
        tokens = sum([w.length for w in windows])
        self._queued_tokens -= tokens
        if not in_slot:
            self._pending_tokens -= tokens
        for w in windows:
            w.req.queued_windows[w.item] -= 1
            if w.req.queued_windows[w.item] == 0:
                self._queued_items -= 1
        self._report_depth_locked()

    def _report_depth_locked(self) -> None:
        """What admission compares with its bounds: the items admitted and not yet handed to the runner
        (being tokenized included), and their tokens (those being tokenized partly estimated)."""
        self.metrics.queue_depth(self._queued_items, self._queued_tokens + self._reserved_tokens)

    def _expire_locked(self, now: float) -> None:
        """Fail requests whose deadline has passed and drop their queued windows (a heap: O(log n) when
        nothing expires)."""
        expired = set()
        while self._deadlines and self._deadlines[0][0] <= now:
            req = heapq.heappop(self._deadlines)[2]()
            if req is not None and not req.done:
                expired.add(req)
        while self._deadlines and _finished(self._deadlines[0][2]()):  # done early: forget
            heapq.heappop(self._deadlines)
        if expired:
            self._fail_locked(
                expired, DeadlineExceededError("deadline passed while queued; not computed"), DROP_DEADLINE
            )

    def _full_locked(self) -> bool:
        if len(self._pending) >= self.max_batch_sequences:
            return True
        if self.padded:
            longest = max([w.length for w in self._pending])
            return longest * len(self._pending) >= self.max_batch_tokens
        return self._pending_tokens >= self.max_batch_tokens

    # ---- batch former thread --------------------------------------------------------------------------
    def _form_loop(self) -> None:
        name_os_thread()
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    self._expire_locked(now)
                    if self._closing:
                        return
                    timeout = None
                    if self._slot is None and self._pending:
                        if self._full_locked():
                            break
                        if self._runner_idle:
                            # Wait for a fuller batch only while more work is about to arrive (calls
                            # being tokenized), and at most max_wait after the oldest window arrived.
                            due = self._pending[0].enqueued + self.max_wait_s
                            if now >= due or not self._tokenizing:
                                break
                            timeout = due - now
                    if self._deadlines:  # wake up to expire the next deadline on time
                        until = self._deadlines[0][0] - now
                        timeout = until if timeout is None else min(timeout, until)
                    self._cond.wait(None if timeout is None else max(timeout, 0.0))
                try:
                    self._form_locked()
                except Exception as exc:  # a planner bug must not wedge the server: fail what is queued
                    log.exception("batch formation failed")
                    self._fail_locked({w.req for w in self._pending}, exc, DROP_BATCH_FAILED)
                self._cond.notify_all()

    def _form_locked(self) -> None:
        """Take the next batch out of the pending windows into the slot. Under the lock, over every queued
        window: the lengths and priorities are read from attributes each window carries (no call, no tuple
        per window), and `next_batch` finds the most urgent without a key function."""
        pending = self._pending
        priorities = [w.priority for w in pending]
        chosen = next_batch(
            [w.length for w in pending],
            self.max_batch_tokens,
            self.max_batch_sequences,
            padded=self.padded,
            priorities=priorities,
            budget=self._budget_locked(pending[most_urgent(priorities)]),
        )
        picked = set(chosen)
        self._slot = [pending[i] for i in chosen]
        self._pending = [w for i, w in enumerate(pending) if i not in picked]
        self._pending_tokens -= sum([w.length for w in self._slot])

    def _budget_locked(self, urgent: _Window) -> int | None:
        """What the batch around the most urgent window may cost: None (the token budget) unless its call has
        a deadline and a batch has measured the device's rate; then what the device computes in URGENT_SHARE
        of the time from when it is free to that deadline, at least max_batch_tokens / URGENT_FLOOR."""
        deadline, rate = urgent.req.deadline, self._seconds_per_token
        if deadline is None or not rate:
            return None
        left = deadline - max(time.monotonic(), self._device_free_at)
        return max(int(URGENT_SHARE * left / rate), self.max_batch_tokens // URGENT_FLOOR)

    def _unform_locked(self) -> None:
        """Put the batch waiting in the slot back among the pending windows, in arrival order (two sorted
        runs: a linear merge), so that the former picks again, now with a more urgent call among them.
        Without this, a prompt with a near deadline waited for the batch running *and* the one formed
        before it arrived: two batch times, seconds on a CPU."""
        slot, self._slot = self._slot or [], None
        self._pending = sorted(slot + self._pending, key=lambda w: w.enqueued)
        self._pending_tokens += sum([w.length for w in slot])

    # ---- runner thread --------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        name_os_thread()
        try:
            while True:
                self._in_flight.acquire()  # released by the collector once a batch's logits are read
                with self._cond:
                    while not self._closing and (self._slot is None or self._held):
                        idle = not self._held  # waiting for a batch, and allowed to take one
                        if idle != self._runner_idle:
                            self._runner_idle = idle
                            self._cond.notify_all()  # the former's readiness depends on it
                        self._cond.wait()
                    self._runner_idle = False
                    if self._closing:
                        return
                    batch, self._slot = self._slot, None
                    self._dequeued_locked(batch, in_slot=True)
                    now = time.monotonic()
                    self._expire_locked(now)  # expired requests fail; their pending windows go too
                    live = [w for w in batch if not w.req.done]
                    tokens = sum([w.length for w in live])
                    if self._seconds_per_token:
                        busy = tokens * self._seconds_per_token
                        self._device_free_at = max(now, self._device_free_at) + busy
                    for w in batch:
                        if w.req.done:  # cancelled or expired while in the slot: not computed
                            why = DROP_DEADLINE if deadline_passed(w.req.deadline, now) else DROP_CANCELLED
                            self.metrics.drop(why, 1)
                    self._cond.notify_all()
                if not live:
                    self._in_flight.release()
                    continue
                launched = self._launch(live, now, tokens)
                if self.in_flight > 1:
                    self._launched.put(launched)  # the collector reads it back
                else:  # one in flight (CPU): read back here, no hand-over between threads
                    self._collect(launched)
        finally:
            self._launched.put(None)  # the collector finishes what was launched, then stops

    def _launch(self, batch: list[_Window], started: float, tokens: int) -> _Launched:
        """Pack and queue the batch (`tokens` in all) on the device (asynchronous on CUDA; computed at once on
        the CPU)."""
        self._batch_counter += 1
        launched = _Launched(batch, self._batch_counter, [started - w.enqueued for w in batch], tokens, None)
        try:
            launched.handle = self.clf.launch([w.ids for w in batch])
        except Exception as exc:
            launched.error = exc
        return launched

    def _collect_loop(self) -> None:
        name_os_thread("safety-collect")  # the OS keeps 15 bytes
        while (launched := self._launched.get()) is not None:
            self._collect(launched)

    def _collect(self, launched: _Launched) -> None:
        """Read a launched batch's logits (waits for the device), free its device slot, and deliver its
        finished requests."""
        batch, batch_id, waits, tokens = launched.batch, launched.batch_id, launched.waits, launched.tokens
        try:
            try:
                if launched.error is not None:
                    raise launched.error
                assert launched.handle is not None
                logits = self.clf.collect(launched.handle)
            finally:  # the device is done with this batch: the runner may queue the next one now, while the
                self._in_flight.release()  # results are converted, aggregated and delivered below
            rows = Rows.of(self.clf, logits)
            seconds, graphed = launched.handle.device_seconds(), launched.handle.graphed
        except Exception as exc:
            log.exception("batch of %d sequences (%d tokens) failed", len(batch), tokens, exc_info=exc)
            if device_failed(exc):
                self._device_failed(exc, batch)
                return
            with self._cond:
                self._fail_locked({w.req for w in batch}, exc, DROP_BATCH_FAILED)
            return
        self.batches_run += 1
        self.sequences_run += len(batch)
        self.metrics.batch(len(batch), tokens, seconds, waits, graphed)
        finished = []
        with self._cond:
            if tokens:
                rate, last = self._seconds_per_token, seconds / tokens
                self._seconds_per_token = last if rate is None else rate + RATE_WEIGHT * (last - rate)
            for w, logit_row, prob_row, wait in zip(batch, rows.logits, rows.probs, waits, strict=True):
                req = w.req
                if req.done:
                    continue
                req.window_rows[w.item][w.index] = (logit_row, prob_row)
                req.queue_s = max(req.queue_s, wait)
                req.batch_seconds[batch_id] = seconds
                req.remaining -= 1
                if req.remaining == 0:
                    req.done = True
                    finished.append(req)
        for req in finished:
            try:
                results = []
                for enc, rows in zip(req.encoded, req.window_rows, strict=True):
                    logit_rows, prob_rows = zip(*rows, strict=True)  # type: ignore[misc]
                    results.append(self.clf.aggregate_rows(enc, logit_rows, prob_rows, req.thresholds))
            except Exception as exc:
                log.exception("aggregation failed")
                _resolve(req, exc)
                continue
            _resolve(req, Outcome(results, req.tokenize_s, req.queue_s, sum(req.batch_seconds.values())))

    def _device_failed(self, exc: BaseException, batch: list[_Window]) -> None:
        """The device is broken for this process: fail the batch and everything queued with UnavailableError
        (retry elsewhere), admit nothing more, and tell the owner once (it takes the replica out)."""
        with self._cond:
            first = self.device_error is None
            self.device_error = exc
            unavailable = self.refusal()
            self._accepting = False
            self._fail_locked(
                {w.req for w in batch} | {w.req for w in self._pending}, unavailable, DROP_DEVICE_FAILED
            )
        if first:
            log.critical("the device failed for good: %s: %s", type(exc).__name__, exc)
            if self.on_device_failure is not None:
                self.on_device_failure(exc)

    def refusal(self) -> UnavailableError:
        """Why a call is refused or failed once the server stops admitting: the device that failed for good,
        if it did (the caller learns the replica is restarting), else the shutdown."""
        exc = self.device_error
        if exc is None:
            return ShuttingDownError("server is shutting down; retry on another replica")
        return DeviceFailedError(
            f"the device failed ({type(exc).__name__}: {str(exc)[:200]}); this replica is restarting, retry "
            "on another"
        )

    # ---- control --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "queued_items": self._queued_items,
                "tokenizing_items": self._tokenizing,
                "queued_tokens": self._queued_tokens,
                "pending_windows": len(self._pending),
                "batches_run": self.batches_run,
                "sequences_run": self.sequences_run,
            }

    def hold_runner(self) -> None:
        """Test hook: the runner takes no new batch until `release_runner` (the queue keeps filling). The
        batcher knows at once (not when the runner thread next wakes): it forms no batch for a held runner,
        so queued windows stay in the queue, where a deadline or a cancel drops them."""
        with self._cond:
            self._held = True
            self._runner_idle = False
            self._cond.notify_all()

    def release_runner(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Fail whatever is still queued with UnavailableError and stop both threads (blocking)."""
        with self._cond:
            self._accepting = False
            self._closing = True
            gone = {w.req for w in self._pending} | {w.req for w in self._slot or []}
            self._fail_locked(gone, self.refusal(), DROP_SHUTDOWN)
            self._cond.notify_all()
        self._in_flight.release()  # a runner waiting for a device slot sees `_closing`
        for t in self._threads:
            t.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _finished(req: _Request | None) -> bool:
    return req is None or req.done


def _resolve(req: _Request, value: Outcome | BaseException) -> None:
    """Complete the request's future on its event loop (from any thread)."""

    def settle() -> None:
        if req.future.done():
            return
        if isinstance(value, BaseException):
            req.future.set_exception(value)
        else:
            req.future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        req.loop.call_soon_threadsafe(settle)
