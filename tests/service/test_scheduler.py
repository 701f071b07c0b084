"""The scheduler on its own (no gRPC): splitting a request over batches, its own deadline expiry,
cancellation, batch failures and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from model import Item
from model.errors import DeadlineExceededError, InvalidInputError, OverloadedError, UnavailableError
from service.scheduler import Scheduler
from tests.service.helpers import queued, wait_until


@pytest.fixture
def scheduler(tiny_classifier: Any) -> Any:
    s = Scheduler(tiny_classifier, max_wait_ms=2.0, encode_threads=1)
    yield s
    s.close()


async def until(predicate: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.005)


def test_items_of_one_request_span_several_batches(scheduler: Any, tiny_classifier: Any) -> None:
    scheduler.max_batch_sequences = 2  # force at least 3 batches for 5 items
    items = [Item(text=f"item number {i} " * (i + 1), id=f"i{i}") for i in range(5)]
    th = tiny_classifier.resolve_thresholds(None)
    outcome = asyncio.run(scheduler.submit(items, th))
    assert scheduler.batches_run >= 3
    want = tiny_classifier.classify(items)
    assert [r.id for r in outcome.results] == [f"i{i}" for i in range(5)]
    for got, w in zip(outcome.results, want, strict=True):
        assert got.scores == pytest.approx(w.scores, abs=1e-5)
        assert got.flagged_labels == w.flagged_labels


def test_scheduler_expires_a_queued_deadline_itself(scheduler: Any, tiny_classifier: Any) -> None:
    th = tiny_classifier.resolve_thresholds(None)
    scheduler.hold_runner()

    async def main() -> None:
        with pytest.raises(DeadlineExceededError, match="not computed"):
            await scheduler.submit([Item(text="late")], th, deadline=time.monotonic() + 0.2)

    asyncio.run(main())
    assert scheduler.stats()["queued_items"] == 0
    scheduler.release_runner()
    assert scheduler.sequences_run == 0


def test_cancelled_call_leaves_the_queue(scheduler: Any, tiny_classifier: Any) -> None:
    th = tiny_classifier.resolve_thresholds(None)
    scheduler.hold_runner()

    async def main() -> None:
        task = asyncio.create_task(scheduler.submit([Item(text="a"), Item(text="b")], th))
        await until(lambda: queued(scheduler) == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert scheduler.stats() | {"batches_run": 0} == {
            "queued_items": 0, "tokenizing_items": 0, "queued_tokens": 0, "pending_windows": 0,
            "batches_run": 0, "sequences_run": 0,
        }  # fmt: skip

    asyncio.run(main())
    scheduler.release_runner()
    outcome = asyncio.run(scheduler.submit([Item(text="after")], th))
    assert len(outcome.results) == 1 and scheduler.sequences_run == 1


def test_close_fails_queued_calls_with_unavailable(tiny_classifier: Any) -> None:
    scheduler = Scheduler(tiny_classifier, encode_threads=1)
    th = tiny_classifier.resolve_thresholds(None)
    scheduler.hold_runner()

    async def main() -> None:
        task = asyncio.create_task(scheduler.submit([Item(text="queued at shutdown")], th))
        await until(lambda: queued(scheduler) == 1)
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)
        with pytest.raises(UnavailableError):
            await task
        with pytest.raises(UnavailableError):
            await scheduler.submit([Item(text="too late")], th)

    asyncio.run(main())
    wait_until(lambda: not any(t.is_alive() for t in scheduler._threads), what="threads stopped")


class _GatedReads:
    """The tiny classifier with a device whose results can only be read once `gate` is set."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.gate = threading.Event()
        self.launched: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def launch(self, seqs: list[list[int]]) -> Any:
        self.launched.append(len(seqs))
        return self._real.launch(seqs)

    def collect(self, logits: Any) -> Any:
        assert self.gate.wait(30), "gate never opened"
        return self._real.collect(logits)


def test_runner_queues_the_next_batch_while_the_previous_is_read_back(tiny_classifier: Any) -> None:
    """At most two batches in flight: the second is launched before the first is read, the third waits."""
    clf = _GatedReads(tiny_classifier)
    scheduler = Scheduler(clf, max_wait_ms=0.0, encode_threads=1, in_flight=2)  # type: ignore[arg-type]
    assert Scheduler(tiny_classifier).in_flight == 1  # the CPU default: a CPU launch computes at once
    th = tiny_classifier.resolve_thresholds(None)

    async def main() -> None:
        first = asyncio.create_task(scheduler.submit([Item(text="first")], th))
        await until(lambda: len(clf.launched) == 1)
        second = asyncio.create_task(scheduler.submit([Item(text="second")], th))
        await until(lambda: len(clf.launched) == 2)  # launched although the first is not read back yet
        third = asyncio.create_task(scheduler.submit([Item(text="third")], th))
        await until(lambda: queued(scheduler) == 1 and scheduler.stats()["pending_windows"] <= 1)
        await asyncio.sleep(0.2)  # a window in which a third launch would show
        assert len(clf.launched) == 2 and not first.done()
        clf.gate.set()
        outcomes = await asyncio.gather(first, second, third)
        assert len(clf.launched) == 3
        want = tiny_classifier.classify([Item(text=t) for t in ("first", "second", "third")])
        for outcome, w in zip(outcomes, want, strict=True):
            assert outcome.results[0].scores == pytest.approx(w.scores, abs=1e-5)

    try:
        asyncio.run(main())
    finally:
        clf.gate.set()
        scheduler.close()


class _FailsOnce:
    """The tiny classifier whose `stage` ("launch" or "collect") raises on its first call only."""

    def __init__(self, real: Any, stage: str) -> None:
        self._real, self._stage, self.calls = real, stage, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name != self._stage:
            return attr

        def once(*args: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError(f"device fault in {name}")
            return attr(*args)

        return once


@pytest.mark.parametrize("stage", ["launch", "collect"])
@pytest.mark.parametrize("in_flight", [1, 2])
def test_failed_batch_fails_its_calls_and_the_scheduler_goes_on(
    tiny_classifier: Any, stage: str, in_flight: int
) -> None:
    """A fault when the batch is launched or when its logits are read back (a CUDA error surfaces there)."""
    scheduler = Scheduler(
        _FailsOnce(tiny_classifier, stage), max_wait_ms=2.0, encode_threads=1, in_flight=in_flight
    )  # type: ignore[arg-type]
    th = tiny_classifier.resolve_thresholds(None)
    try:
        with pytest.raises(RuntimeError, match=f"device fault in {stage}"):
            asyncio.run(scheduler.submit([Item(text="x")], th))
        assert len(asyncio.run(scheduler.submit([Item(text="y")], th)).results) == 1
        assert scheduler.stats()["queued_items"] == 0
    finally:
        scheduler.close()


class GatedEncode:
    """`clf.encode` that records each piece and waits for `gate` before tokenizing it."""

    def __init__(self, clf: Any) -> None:
        self.clf, self.encode_real = clf, clf.encode
        self.pieces: list[int] = []
        self.started = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)

    def __call__(self, items: list[Item]) -> Any:
        self.pieces.append(len(items))
        self.started.release()
        assert self.gate.acquire(timeout=30)
        return self.encode_real(items)


@pytest.fixture
def gated(tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch) -> GatedEncode:
    import service.scheduler

    monkeypatch.setattr(service.scheduler, "PIECE_CHARS", 20)  # items of 10 characters: two a piece
    gate = GatedEncode(tiny_classifier)
    monkeypatch.setattr(tiny_classifier, "encode", gate)
    return gate


ITEMS = [Item(text=f"item {i:05d}") for i in range(8)]  # 10 characters each: four pieces of two


def test_a_cancelled_call_stops_tokenizing_and_holds_its_admission_until_its_piece_ends(
    gated: GatedEncode, tiny_classifier: Any
) -> None:
    """A large call whose caller is gone must not keep the tokenizer threads busy (or its memory) with
    pieces nobody will read, and the piece still running counts against the bounds until it ends."""
    scheduler = Scheduler(tiny_classifier, encode_threads=1)
    th = tiny_classifier.resolve_thresholds(None)

    async def main() -> None:
        task = asyncio.create_task(scheduler.submit(ITEMS, th))
        assert await asyncio.to_thread(gated.started.acquire, timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert scheduler.stats()["tokenizing_items"] == 8  # the first piece is still being tokenized
        gated.gate.release()
        await until(lambda: scheduler.stats()["tokenizing_items"] == 0)

    try:
        asyncio.run(main())
        assert gated.pieces == [2]  # not the other three
        assert scheduler.stats()["queued_items"] == 0 and scheduler._reserved_tokens == 0
    finally:
        scheduler.close()


def test_a_call_past_the_whole_queue_bound_is_refused_without_tokenizing_the_rest(
    gated: GatedEncode, tiny_classifier: Any
) -> None:
    (one,) = gated.encode_real([ITEMS[0]])
    scheduler = Scheduler(tiny_classifier, encode_threads=1, max_queue_tokens=3 * len(one.windows[0]))
    th = tiny_classifier.resolve_thresholds(None)
    for _ in range(8):
        gated.gate.release()
    try:
        with pytest.raises(
            InvalidInputError, match=r"items: the request has more than \d+ tokens \(its first 4"
        ):
            asyncio.run(scheduler.submit(ITEMS, th))
        assert gated.pieces == [2, 2]
        assert scheduler.stats()["queued_items"] == 0 and scheduler._reserved_tokens == 0
    finally:
        scheduler.close()


def test_a_text_alone_larger_than_one_call_may_queue_is_named_with_its_tokens(tiny_classifier: Any) -> None:
    """With no character limit to allow for (the scheduler on its own; behind the server's max_text_chars, a
    tokenizer making more than 4 tokens a character), an item past what one call may queue is named."""
    text = "a b c d e f g h " * 600
    (enc,) = tiny_classifier.encode([Item(text=text)])
    tokens = sum(len(w) for w in enc.windows)
    scheduler = Scheduler(tiny_classifier, encode_threads=1, max_queue_tokens=2048)
    assert scheduler.max_call_tokens == 2048 < tokens
    th = tiny_classifier.resolve_thresholds(None)
    try:
        with pytest.raises(InvalidInputError) as err:
            asyncio.run(scheduler.submit([Item(text="short"), Item(text=text)], th))
        assert str(err.value).startswith(
            f"items[1].text: makes {tokens} tokens ({len(enc.windows)} windows), more than the server's "
            "whole queue bound of 2048 (SAFETY_MAX_QUEUE_TOKENS)"
        ), str(err.value)
        assert scheduler.stats()["queued_items"] == 0 and scheduler._reserved_tokens == 0
    finally:
        scheduler.close()


def test_of_two_calls_larger_than_the_bound_only_one_joins_the_queue_over_it(
    gated: GatedEncode, tiny_classifier: Any
) -> None:
    """Calls larger than the token bound (up to what one item within max_text_chars makes) join a queue
    below the bound. Both are admitted while the queue is empty (each reserves an estimate, at most a
    quarter of the bound); the first tokenized takes the queue over the bound, so the second is refused
    once tokenized: the queue never holds more than the bound plus one such call."""
    chars, bound = 1000, 2048
    scheduler = Scheduler(tiny_classifier, encode_threads=1, max_queue_tokens=bound, max_text_chars=chars)
    most = tiny_classifier.most_tokens(chars)
    assert scheduler.max_call_tokens == most > bound
    worst = "\U0001f600" * chars  # 4 tokens a character, as a response and its context: the most
    huge = [Item(text=worst, role="response", context=worst)]
    th = tiny_classifier.resolve_thresholds(None)

    async def main() -> None:
        first = asyncio.create_task(scheduler.submit(huge, th))
        assert await asyncio.to_thread(gated.started.acquire, timeout=10)
        second = asyncio.create_task(scheduler.submit(huge, th))
        await until(lambda: scheduler.stats()["queued_items"] == 2)  # both admitted
        gated.gate.release()
        await until(lambda: queued(scheduler) == 1)
        assert scheduler.stats()["queued_tokens"] == most
        gated.gate.release()
        with pytest.raises(
            OverloadedError,
            match=rf"queue full \({most} tokens queued, the bound is {bound}; this call's {most} tokens are "
            r"queued only while the queue is below it\)",
        ):
            await second
        assert queued(scheduler) == 1 and scheduler.stats()["tokenizing_items"] == 0
        scheduler.release_runner()
        (result,) = (await first).results
        assert result.windows == len(gated.encode_real(huge)[0].windows)

    scheduler.hold_runner()
    try:
        asyncio.run(main())
        assert scheduler.stats()["queued_tokens"] == 0 and scheduler._reserved_tokens == 0
    finally:
        scheduler.close()


def test_admission_counts_the_tokens_of_calls_still_being_tokenized(
    gated: GatedEncode, tiny_classifier: Any
) -> None:
    """A burst must be refused at once, not after each call waited its turn to be tokenized (and often ran
    past its deadline there): calls being tokenized reserve their estimated tokens."""
    scheduler = Scheduler(tiny_classifier, encode_threads=1, max_queue_tokens=80)  # 8 x 10 chars: ~20 each
    th = tiny_classifier.resolve_thresholds(None)

    async def main() -> None:
        burst = [asyncio.create_task(scheduler.submit(ITEMS, th)) for _ in range(4)]
        assert await asyncio.to_thread(gated.started.acquire, timeout=10)  # one tokenizing, three waiting
        with pytest.raises(OverloadedError, match=r"0 tokens queued and about 80 being tokenized"):
            await scheduler.submit([Item(text="a burst")], th)
        for task in burst:
            task.cancel()
        # each sets its stop before the piece in the tokenizer ends (a race before: on a busy machine the
        # tokenizer went on to a second piece, gated for 30 s)
        for task in burst:
            with pytest.raises(asyncio.CancelledError):
                await task
        gated.gate.release()
        await until(lambda: scheduler.stats()["tokenizing_items"] == 0)
        assert scheduler._reserved_tokens == 0

    try:
        asyncio.run(main())
        assert gated.pieces == [2]
    finally:
        scheduler.close()


def test_one_huge_call_reserves_at_most_a_quarter_of_the_token_bound(
    gated: GatedEncode, tiny_classifier: Any
) -> None:
    """It will most likely be refused after its first pieces; meanwhile the other calls are admitted."""
    scheduler = Scheduler(tiny_classifier, encode_threads=1, max_queue_tokens=80)
    th = tiny_classifier.resolve_thresholds(None)
    huge = [Item(text="x" * 10_000)]  # ~2,500 tokens estimated, more than the whole bound

    async def main() -> None:
        task = asyncio.create_task(scheduler.submit(huge, th))
        assert await asyncio.to_thread(gated.started.acquire, timeout=10)
        assert scheduler._reserved_tokens == 20
        small = asyncio.create_task(scheduler.submit([Item(text="admitted")], th))
        await until(lambda: scheduler.stats()["queued_items"] == 2)  # admitted, waiting for the tokenizer
        for t in (task, small):
            t.cancel()
        for t in (task, small):  # cancelled before the gate opens: the tokenizer must not start `small`
            with pytest.raises(asyncio.CancelledError):
                await t
        gated.gate.release()
        await until(lambda: scheduler.stats()["queued_items"] == 0)

    try:
        asyncio.run(main())
    finally:
        scheduler.close()


def test_close_stops_a_call_being_tokenized_between_pieces(gated: GatedEncode, tiny_classifier: Any) -> None:
    """A drain must not wait for the rest of a large call's tokenization (the process cannot exit while an
    encode thread runs)."""
    scheduler = Scheduler(tiny_classifier, encode_threads=1)
    th = tiny_classifier.resolve_thresholds(None)

    async def main() -> None:
        task = asyncio.create_task(scheduler.submit(ITEMS, th))
        assert await asyncio.to_thread(gated.started.acquire, timeout=10)
        await asyncio.to_thread(scheduler.close)
        gated.gate.release()
        with pytest.raises(UnavailableError, match="shutting down"):
            await task

    asyncio.run(main())
    assert gated.pieces == [2]


def test_the_reservation_of_a_call_becomes_its_real_tokens_piece_by_piece(
    gated: GatedEncode, tiny_classifier: Any
) -> None:
    """Admission counts an estimate for a call not tokenized yet; each tokenized piece replaces its share of
    the estimate with real tokens, and the call's own ratio so far estimates the rest."""
    real = sum(len(w) for e in gated.encode_real(ITEMS) for w in e.windows)
    scheduler = Scheduler(tiny_classifier, encode_threads=1)
    th = tiny_classifier.resolve_thresholds(None)
    estimate = round(sum(len(it.text) for it in ITEMS) * 0.25)  # the ratio before any call
    assert real > 2 * estimate  # "item 00000": about a token per character

    async def main() -> None:
        task = asyncio.create_task(scheduler.submit(ITEMS, th))
        assert await asyncio.to_thread(gated.started.acquire, timeout=10)
        assert scheduler._reserved_tokens == estimate
        for _ in range(3):  # three pieces of four tokenized, the fourth waits at the gate
            gated.gate.release()
            assert await asyncio.to_thread(gated.started.acquire, timeout=10)
        assert scheduler._reserved_tokens == real  # six items counted, two estimated at the call's own ratio
        gated.gate.release()
        await task
        assert scheduler._reserved_tokens == 0

    try:
        asyncio.run(main())
    finally:
        scheduler.close()


def test_one_unusual_call_does_not_inflate_later_estimates_for_long(
    tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large CJK call (~3 tokens a character) once made every later estimate of the process's life too
    large (the ratio was cumulative, weighted by characters): bursts of ordinary calls were then refused as if
    the queue were full. Twenty ordinary calls after it, the estimate is back near the real count."""

    def tokens(item: Item) -> int:
        return sum(len(w) for e in tiny_classifier.encode([item]) for w in e.windows)

    cjk = Item(text="漢字の試験。" * 1500)
    english = Item(text="the quick brown fox jumps over the lazy dog " * 100)
    real = tokens(english)
    assert tokens(cjk) / len(cjk.text) > 5 * real / len(english.text)
    scheduler = Scheduler(tiny_classifier, encode_threads=1)
    th = tiny_classifier.resolve_thresholds(None)

    async def main() -> None:
        await scheduler.submit([cjk], th)
        for _ in range(20):
            await scheduler.submit([english], th)
        gate = GatedEncode(tiny_classifier)
        monkeypatch.setattr(tiny_classifier, "encode", gate)
        probe = asyncio.create_task(scheduler.submit([english], th))
        assert await asyncio.to_thread(gate.started.acquire, timeout=10)
        assert scheduler._reserved_tokens <= 1.1 * real  # the cumulative ratio: 1.5 x
        gate.gate.release()
        await probe

    try:
        asyncio.run(main())
    finally:
        scheduler.close()


def test_the_queue_gauges_show_what_admission_compares_with_its_bounds(
    gated: GatedEncode, tiny_classifier: Any
) -> None:
    """Calls being tokenized count against the token bound, so the token gauge counts them too (it showed
    only the tokens already queued: a burst was refused while the gauge and the alert on it saw an idle
    queue), and the bounds are exported beside the gauges."""
    from service.metrics import Metrics

    metrics = Metrics()
    scheduler = Scheduler(tiny_classifier, encode_threads=1, max_queue_tokens=80, metrics=metrics)
    th = tiny_classifier.resolve_thresholds(None)

    def gauge(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    async def main() -> None:
        assert gauge("safety_queue_max_items") == 4096 and gauge("safety_queue_max_tokens") == 80
        burst = [asyncio.create_task(scheduler.submit(ITEMS, th)) for _ in range(4)]
        assert await asyncio.to_thread(gated.started.acquire, timeout=10)  # one tokenizing, three waiting
        with pytest.raises(OverloadedError, match=r"0 tokens queued and about 80 being tokenized"):
            await scheduler.submit([Item(text="refused")], th)
        assert gauge("safety_queue_tokens") == 80 and gauge("safety_queue_items") == 32
        for task in burst:
            task.cancel()
        for task in burst:
            with pytest.raises(asyncio.CancelledError):
                await task
        gated.gate.release()
        await until(lambda: scheduler.stats()["tokenizing_items"] == 0)
        assert gauge("safety_queue_tokens") == 0 and gauge("safety_queue_items") == 0

    try:
        asyncio.run(main())
    finally:
        scheduler.close()
