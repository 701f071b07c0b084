"""The order in which a real server's scheduler runs queued windows: earliest deadline first, a deadline
counting as at most SAFETY_DEADLINE_HORIZON_MS after the call was queued (a call without one: exactly that).
One window per batch, so the order of the launches is the order of the windows."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from model import Item
from service.server import SafetyServer
from tests.service.helpers import in_queue, request, wait_until

BULK = "the quick brown fox jumps over the lazy dog " * 250  # several 1,024-token windows
PROMPT = "hi"


class Launches:
    """A server's classifier that records the window lengths of every batch it launches."""

    def __init__(self, clf: Any) -> None:
        self._clf = clf
        self.batches: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clf, name)

    def launch(self, sequences: list[list[int]]) -> Any:
        self.batches.append([len(s) for s in sequences])
        return self._clf.launch(sequences)


@pytest.fixture
def one_window_a_batch(
    start_server: Callable[..., SafetyServer],
) -> Callable[..., tuple[SafetyServer, Launches]]:
    def start(**settings: Any) -> tuple[SafetyServer, Launches]:
        app = start_server(**settings)
        app.scheduler.max_batch_sequences = 1
        launches = Launches(app.scheduler.clf)
        app.scheduler.clf = launches
        return app, launches

    return start


def windows(clf: Any, text: str) -> int:
    (enc,) = clf.encode([Item(text=text)])
    return len(enc.windows)


def test_a_prompt_with_a_deadline_runs_before_an_earlier_bulk_call_without_one(
    one_window_a_batch: Any, stub_for: Any, tiny_classifier: Any
) -> None:
    """Head-of-line blocking: a prompt sent while a large call without a deadline is queued used to wait for
    all of it (first come, first served), so a gateway's short deadlines all ran out behind it. The prompt
    comes after the former formed the next batch (of the bulk call) for the held runner: that batch is
    formed again with the prompt among the candidates (it used to keep its place: the prompt waited for the
    batch running and that one, two batch times, seconds on a CPU)."""
    bulk_windows = windows(tiny_classifier, BULK)
    assert bulk_windows >= 3
    app, launches = one_window_a_batch(deadline_horizon_ms=600_000)  # the prompt's 60 s deadline is nearer
    stub = stub_for(app)
    app.scheduler.hold_runner()
    try:
        bulk = stub.Classify.future(request(BULK))  # no deadline
        wait_until(lambda: app.scheduler._slot is not None, what="a batch of the bulk call formed")
        prompt = stub.Classify.future(request(PROMPT), timeout=60)
        wait_until(lambda: in_queue(app) == 2, what="the prompt queued")
    finally:
        app.scheduler.release_runner()
    assert len(prompt.result(60).results) == 1 and len(bulk.result(60).results) == 1
    lengths = [n for batch in launches.batches for n in batch]
    assert len(lengths) == bulk_windows + 1
    # First come, first served ran the prompt last. Now it runs first: a batch of the bulk call the former
    # formed for the held runner before the prompt came is formed again with it.
    [prompt_at] = [i for i, n in enumerate(lengths) if n < 16]
    assert prompt_at == 0, lengths


def test_a_call_without_a_deadline_runs_before_later_ones_once_its_horizon_has_passed(
    one_window_a_batch: Any, stub_for: Any, tiny_classifier: Any
) -> None:
    """No starvation: a call's implicit deadline is its arrival plus the horizon, and everything arriving
    after that has a later one, however short its own deadline. (Earliest deadline first without the
    horizon would run the prompt first here, and behind a steady flow of prompts never run the bulk call.)"""
    horizon = 0.2
    bulk_windows = windows(tiny_classifier, BULK)
    app, launches = one_window_a_batch(deadline_horizon_ms=horizon * 1000)
    stub = stub_for(app)
    app.scheduler.hold_runner()
    try:
        bulk = stub.Classify.future(request(BULK))  # no deadline
        wait_until(lambda: in_queue(app) == 1, what="the bulk call queued")
        queued = time.monotonic()  # the call was queued before this
        wait_until(lambda: time.monotonic() > queued + horizon, what="the bulk call's horizon passed")
        prompt = stub.Classify.future(request(PROMPT), timeout=60)
        wait_until(lambda: in_queue(app) == 2, what="the prompt queued")
    finally:
        app.scheduler.release_runner()
    assert len(prompt.result(60).results) == 1 and len(bulk.result(60).results) == 1
    lengths = [n for batch in launches.batches for n in batch]
    assert len(lengths) == bulk_windows + 1
    assert lengths[-1] < 16 and all(n >= 16 for n in lengths[:-1]), lengths


def test_the_batch_around_a_prompt_with_a_deadline_ends_well_before_it(
    start_server: Callable[..., SafetyServer], stub_for: Any, tiny_classifier: Any
) -> None:
    """A prompt behind a bulk call went first, but in a full token budget of the bulk call's windows (its
    length neighbours): on a CPU a second or more of its own after the batch running, and under load past a
    5 s deadline. Its batch is now what the device computes, at its recent rate, in half the time left to the
    deadline (not below an eighth of the budget); the bulk call's later batches are full again."""
    app = start_server()
    launches = Launches(app.scheduler.clf)
    app.scheduler.clf = launches
    # planned as for a packed kernel (a GPU's): a padded one (CPU SDPA) never puts a 4-token prompt beside
    # 1,024-token windows, so its batch is the prompt alone anyway
    app.scheduler.padded = False
    budget = app.scheduler.max_batch_tokens
    window = tiny_classifier.limits.max_tokens
    bulk_text = BULK * (2 * budget // (windows(tiny_classifier, BULK) * window) + 1)  # over two budgets
    # a device at 4,000 tokens a second: 10,000 tokens in half of the prompt's 5 s (nearer than the bulk
    # call's horizon, 10 s: the prompt goes first)
    seconds_per_token, deadline_s = 2.5e-4, 5.0
    assert (
        budget // 8 < 0.4 * deadline_s / seconds_per_token and 0.5 * deadline_s / seconds_per_token < budget
    )
    stub = stub_for(app)
    app.scheduler.hold_runner()
    try:
        bulk = stub.Classify.future(request(bulk_text))  # no deadline
        wait_until(lambda: app.scheduler._slot is not None, what="a batch of the bulk call formed")
        with app.scheduler._cond:
            app.scheduler._seconds_per_token = seconds_per_token
        sent = time.monotonic()
        prompt = stub.Classify.future(request(PROMPT), timeout=deadline_s)
        wait_until(lambda: in_queue(app) == 2, what="the prompt queued")
    finally:
        app.scheduler.release_runner()
    assert len(prompt.result(60).results) == 1 and len(bulk.result(60).results) == 1
    first, *rest = launches.batches
    assert min(first) < 16, first  # the prompt's batch runs first
    left = deadline_s - (time.monotonic() - sent)  # at least what was left when the batch was formed
    assert 0.5 * left / seconds_per_token - window < sum(first) <= 0.5 * deadline_s / seconds_per_token, first
    assert sum(rest[0]) > budget - window, rest[0]  # without a deadline: the whole budget
