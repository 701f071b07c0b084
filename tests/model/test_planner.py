"""The length-bucket planner: pure lists in, lists out."""

from __future__ import annotations

import math
import random

import pytest

from model.planner import MAX_PADDING, batch_cost, chunk_end, due, next_batch, plan_batches


def traffic_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(2, min(2048, int(rng.lognormvariate(4.8, 1.0)))) for _ in range(n)]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("tokens", "seqs"), [(4096, 64), (2048, 8), (20000, 1000)])
def test_every_index_exactly_once_within_budgets(padded: bool, tokens: int, seqs: int) -> None:
    lengths = traffic_lengths(500)
    batches = plan_batches(lengths, tokens, seqs, padded=padded)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= seqs
        assert batch_cost([lengths[i] for i in b], padded) <= tokens
        if padded and len(b) > 1:
            assert batch_cost([lengths[i] for i in b], True) <= (1 + MAX_PADDING) * sum(lengths[i] for i in b)


def test_buckets_group_similar_lengths() -> None:
    lengths = traffic_lengths(400, seed=1)
    batches = plan_batches(lengths, 4096, 64, padded=True)
    padded_cost = sum(batch_cost([lengths[i] for i in b], True) for b in batches)
    assert padded_cost <= 1.25 * sum(lengths)  # little padding waste
    # Arrival-order batching of the same budget wastes far more.
    arrival, cur = [], []
    for i in range(len(lengths)):
        if cur and batch_cost([lengths[j] for j in [*cur, i]], True) > 4096:
            arrival.append(cur)
            cur = []
        cur.append(i)
    arrival.append(cur)
    assert sum(batch_cost([lengths[i] for i in b], True) for b in arrival) > 1.5 * padded_cost


def test_priorities_order_batches_and_restore() -> None:
    lengths = [10, 500, 12, 480, 11]
    priorities = [5.0, 0.0, 4.0, 1.0, 3.0]  # the long ones are most urgent
    batches = plan_batches(lengths, 1000, 2, priorities=priorities)
    # sorted by length: [10, 11] [12, 480] [500]; the batch holding priority 0 goes first, then priority 1
    assert batches == [[1], [2, 3], [0, 4]]
    assert plan_batches(lengths, 1000, 2) == [[0, 4], [2, 3], [1]]


def test_single_sequence_at_budget_and_errors() -> None:
    assert plan_batches([100], 100, 1) == [[0]]
    assert plan_batches([], 100, 1) == []
    with pytest.raises(ValueError, match=r"lengths\[1\] = 101 exceeds max_batch_tokens 100"):
        plan_batches([5, 101], 100, 4)
    with pytest.raises(ValueError, match="at least one token"):
        plan_batches([0], 100, 4)
    with pytest.raises(ValueError, match="priorities"):
        plan_batches([1, 2], 100, 4, priorities=[1.0])


def test_next_batch_takes_most_urgent_with_length_neighbours() -> None:
    lengths = [100, 5, 98, 300, 103, 6, 99]
    # oldest (index 0) first by default; its neighbours in length are 98, 99, 103
    assert next_batch(lengths, 400, 4) == [2, 6, 0, 4]
    # padded: 4 x 103 = 412 > 400 and a length-6 neighbour would pad 94 tokens (> 25% waste): stop at three
    assert next_batch(lengths, 400, 4, padded=True) == [2, 6, 0]
    # packed kernels pay no padding, so the short neighbour is fine there
    assert next_batch([100, 6, 99], 400, 3) == [1, 2, 0]
    urgent = next_batch(lengths, 1000, 3, priorities=[9, 9, 9, 0, 9, 9, 9])
    assert 3 in urgent and len(urgent) == 3
    assert next_batch([], 10, 1) == []


def test_next_batch_within_a_budget_below_the_token_budget() -> None:
    """A batch that must end before the most urgent entry's deadline costs at most `budget`; the urgent entry
    goes even when it alone costs more."""
    lengths = [7, 400, 390, 410, 8, 395, 405]
    urgent = [9.0, 9, 9, 9, 0, 9, 9]  # the 8-token prompt
    assert next_batch(lengths, 2000, 16, priorities=urgent) == [0, 4, 2, 5, 1, 6]
    assert next_batch(lengths, 2000, 16, priorities=urgent, budget=10**6) == [0, 4, 2, 5, 1, 6]
    assert next_batch(lengths, 2000, 16, priorities=urgent, budget=500) == [0, 4, 2]
    assert next_batch(lengths, 2000, 16, priorities=urgent, budget=3) == [4]
    # padded: the cost is the longest x the count
    lengths = [400, 390, 410, 395, 405]
    urgent = [9.0, 0, 9, 9, 9]
    assert next_batch(lengths, 2000, 16, padded=True, priorities=urgent) == [1, 3, 0, 4]
    assert next_batch(lengths, 2000, 16, padded=True, priorities=urgent, budget=1200) == [1, 3, 0]
    assert next_batch(lengths, 2000, 16, padded=True, priorities=urgent, budget=100) == [1]


@pytest.mark.parametrize("padded", [False, True])
def test_next_batch_respects_budgets_and_drains_everything(padded: bool) -> None:
    lengths = traffic_lengths(300, seed=3)
    pending = list(range(len(lengths)))
    seen: list[int] = []
    while pending:
        pick = next_batch([lengths[i] for i in pending], 3000, 16, padded=padded)
        assert pick, "a non-empty queue always yields a batch"
        chosen = [pending[i] for i in pick]
        assert len(chosen) <= 16
        assert batch_cost([lengths[i] for i in chosen], padded) <= 3000
        if padded and len(chosen) > 1:
            assert batch_cost([lengths[i] for i in chosen], True) <= 1.25 * sum(lengths[i] for i in chosen)
        seen.extend(chosen)
        pending = [p for k, p in enumerate(pending) if k not in set(pick)]
    assert sorted(seen) == list(range(len(lengths)))


@pytest.mark.parametrize("padded", [False, True])
def test_next_batch_anchors_on_the_first_of_the_smallest_priorities(padded: bool) -> None:
    """The anchor is the entry the old rule chose, `min(range(n), key=lambda i: (priorities[i], i))` (the
    smallest priority, ties to the first index), found without a tuple per entry; the batch around it is a
    run of the entries in (length, index) order, returned in that order."""
    rng = random.Random(7)
    for trial in range(400):
        n = rng.randint(1, 60)
        lengths = [rng.randint(1, 12) for _ in range(n)]  # few distinct values: many ties in length
        spread = rng.choice([1, 3, 1000])  # 1: every priority equal
        priorities = [float(rng.randrange(spread)) / 4 for _ in range(n)]
        old = min(range(n), key=lambda i: (priorities[i], i))
        assert next_batch(lengths, 12, 1, padded=padded, priorities=priorities) == [old], trial
        batch = next_batch(lengths, 40, 8, padded=padded, priorities=priorities)
        order = sorted(range(n), key=lambda i: (lengths[i], i))
        start = order.index(batch[0])
        assert old in batch and batch == order[start : start + len(batch)], trial
    assert next_batch([3, 3, 3], 10, 1) == [0]  # no priorities: the oldest


def test_due_is_the_deadline_but_no_later_than_the_horizon_after_arrival() -> None:
    assert due(arrived=100.0, deadline=100.25, horizon=10.0) == 100.25
    assert due(arrived=100.0, deadline=None, horizon=10.0) == 110.0
    assert due(arrived=100.0, deadline=300.0, horizon=10.0) == 110.0  # a far deadline counts as none
    assert due(arrived=100.0, deadline=None, horizon=0.0) == due(100.0, 100.5, 0.0) == 100.0  # arrival order


def test_a_near_deadline_goes_before_an_earlier_entry_without_one() -> None:
    """A gateway prompt (0.25 s deadline) arriving while a bulk call (no deadline) is queued: earliest
    deadline first anchors the batch on the prompt; horizon 0 is first come, first served."""
    lengths = [1000, 1000, 1000, 4]  # three windows of a bulk call, then a prompt, one per batch
    arrived, deadlines = [0.0, 0.0, 0.0, 1.0], [None, None, None, 1.25]
    for horizon, first in ((10.0, 3), (0.0, 0)):
        priorities = [due(a, d, horizon) for a, d in zip(arrived, deadlines, strict=True)]
        assert next_batch(lengths, 1000, 1, priorities=priorities) == [first]


@pytest.mark.parametrize("horizon", [1.0, 3.0])
def test_an_entry_without_a_deadline_runs_once_its_horizon_passes_while_urgent_ones_keep_coming(
    horizon: float,
) -> None:
    """A bulk window arrives at 0; from then on an urgent entry (0.25 s deadline) arrives every 0.1 s and
    one batch of one entry runs every 0.1 s, so there is always an urgent entry queued. The bulk window
    runs by the time its horizon passes; with no horizon (a plain earliest deadline first) it never would."""

    def bulk_runs_at(horizon: float, steps: int = 200) -> float | None:
        pending = [(0.0, None, "bulk")]  # (arrived, deadline, name)
        for step in range(steps):
            now = step / 10
            pending.append((now, now + 0.25, f"urgent {step}"))
            pending = [p for p in pending if p[1] is None or p[1] > now]  # expired ones are dropped
            priorities = [due(a, d, horizon) for a, d, _ in pending]
            (pick,) = next_batch([10] * len(pending), 100, 1, priorities=priorities)
            if pending.pop(pick)[2] == "bulk":
                return now
        return None

    ran = bulk_runs_at(horizon)
    assert ran is not None and horizon - 0.25 <= ran <= horizon
    assert bulk_runs_at(math.inf) is None


def test_chunk_end_takes_the_fewest_items_reaching_the_target() -> None:
    sizes = [5, 5, 5, 20, 1, 1, 1, 3]
    ends, start = [], 0
    while start < len(sizes):
        start = chunk_end(sizes, start, 10)
        ends.append(start)
    assert ends == [2, 4, 8]  # [5, 5] [5, 20] [1, 1, 1, 3]: the last is what is left
    assert chunk_end([50, 1], 0, 10) == 1  # one large item is its own chunk
    assert chunk_end(sizes, 3, 0) == 4  # at least one item
    assert chunk_end(sizes, 0, 10**9) == len(sizes) and chunk_end(sizes, 5, 2.5) == 8
    assert chunk_end([], 0, 10) == 0
