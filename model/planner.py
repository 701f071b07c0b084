"""Length-bucket batch planning. Pure: no torch, no I/O, no threads — lists in, lists out.

Owns: which sequences run together. Sequences are grouped by similar length so a padded kernel (CPU SDPA)
wastes little on padding and a packed kernel (GPU varlen) fills its token budget. A batch's cost is what the
kernel pays: the sum of lengths when packed, `max length x count` when padded — and a padded batch never
costs more than MAX_PADDING above its real tokens (a short sequence does not join a long bucket). Entry
points:
  * `plan_batches` — a whole known set (offline `classify`, the worker): every index exactly once;
  * `next_batch`   — one batch for a dynamic scheduler: the most urgent entry plus its nearest neighbours
                     in length, so deadlines and arrival order are honoured without losing bucketing;
  * `due`          — an entry's urgency for `next_batch`: earliest deadline first, where no deadline counts
                     as later than `horizon` after arrival, so entries without one cannot starve;
  * `chunk_end`    — where the next chunk of a large offline set ends (consecutive items reaching a size), so
                     the next chunk can be tokenized while the device runs this one.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_PADDING = 0.25  # padded kernels: a batch may cost at most 25% more than its real tokens


def batch_cost(lengths: Sequence[int], padded: bool) -> int:
    if not lengths:
        return 0
    return max(lengths) * len(lengths) if padded else sum(lengths)


def _check(lengths: Sequence[int], max_batch_tokens: int, max_batch_sequences: int) -> None:
    if max_batch_tokens <= 0 or max_batch_sequences <= 0:
        raise ValueError("max_batch_tokens and max_batch_sequences must be positive")
    for i, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"lengths[{i}] = {n}: every sequence needs at least one token")
        if n > max_batch_tokens:
            raise ValueError(f"lengths[{i}] = {n} exceeds max_batch_tokens {max_batch_tokens}")


def plan_batches(
    lengths: Sequence[int],
    max_batch_tokens: int,
    max_batch_sequences: int,
    *,
    padded: bool = False,
    priorities: Sequence[float] | None = None,
) -> list[list[int]]:
    """Partition range(len(lengths)) into length buckets under both budgets.

    Sorted by length, cut greedily where adding the next sequence would exceed a budget. Batches are returned
    most urgent first when `priorities` (smaller = sooner: a deadline or an arrival number) are given, else in
    ascending length. Indices inside a batch are ascending by length."""
    _check(lengths, max_batch_tokens, max_batch_sequences)
    if priorities is not None and len(priorities) != len(lengths):
        raise ValueError("priorities must have one entry per length")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    total = longest = 0
    for i in order:
        n = lengths[i]
        cost = max(longest, n) * (len(current) + 1) if padded else total + n
        wasteful = padded and cost > (1 + MAX_PADDING) * (total + n)
        if current and (cost > max_batch_tokens or len(current) >= max_batch_sequences or wasteful):
            batches.append(current)
            current, total, longest = [], 0, 0
        current.append(i)
        total += n
        longest = max(longest, n)
    if current:
        batches.append(current)
    if priorities is not None:
        batches.sort(key=lambda b: min((priorities[i], i) for i in b))
    return batches


def most_urgent(priorities: Sequence[float] | None) -> int:
    """The entry a batch forms around: the first of the smallest priorities; without priorities, index 0 (the
    oldest). Both scans run in C, with no key function or tuple per entry (the scheduler calls this under its
    lock, once per batch, over every queued window)."""
    return priorities.index(min(priorities)) if priorities is not None else 0


def next_batch(
    lengths: Sequence[int],
    max_batch_tokens: int,
    max_batch_sequences: int,
    *,
    padded: bool = False,
    priorities: Sequence[float] | None = None,
    budget: int | None = None,
) -> list[int]:
    """One batch from pending entries: the most urgent (the first of the smallest priorities; without
    priorities, index 0 = the oldest) plus the entries nearest to it in length, grown one neighbour at a time
    while both budgets hold. `budget`: what this batch may cost, when less than `max_batch_tokens` (a batch
    that must end before the most urgent entry's deadline); the most urgent entry goes whatever its cost.
    Returned ascending by (length, index)."""
    if not lengths:
        return []
    _check(lengths, max_batch_tokens, max_batch_sequences)
    if priorities is not None and len(priorities) != len(lengths):
        raise ValueError("priorities must have one entry per length")
    limit = max_batch_tokens if budget is None else min(budget, max_batch_tokens)
    anchor = most_urgent(priorities)
    # By (length, index): sorting is stable, so ties in length stay in index order without a tuple key.
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    pos = order.index(anchor)
    lo, hi = pos, pos + 1  # chosen = order[lo:hi]
    total = longest = lengths[anchor]

    def fits(n: int) -> bool:
        if not padded:
            return total + n <= limit
        cost = max(longest, n) * (hi - lo + 1)
        return cost <= limit and cost <= (1 + MAX_PADDING) * (total + n)

    while hi - lo < max_batch_sequences:
        left = order[lo - 1] if lo > 0 else None
        right = order[hi] if hi < len(order) else None
        if left is None and right is None:
            break
        a = lengths[anchor]
        if right is None or (left is not None and a - lengths[left] <= lengths[right] - a):
            pick, step = left, -1
        else:
            pick, step = right, +1
        if not fits(lengths[pick]):
            # the other side may still fit (a shorter neighbour when padded, for instance)
            other = right if step == -1 else left
            if other is None or not fits(lengths[other]):
                break
            pick, step = other, -step
        n = lengths[pick]
        if step == -1:
            lo -= 1
        else:
            hi += 1
        total += n
        longest = max(longest, n)
    return order[lo:hi]  # a run of `order`: ascending by (length, index) already


def due(arrived: float, deadline: float | None, horizon: float) -> float:
    """An entry's priority for `next_batch` (smaller: sooner): its deadline, but no later than `horizon` after
    it `arrived`, and exactly that when it has none. Earliest deadline first, with an implicit deadline for
    every entry: a call with a near deadline goes before earlier calls without one, and none starves, since
    once an entry's horizon has passed, everything that arrives later has a later priority (its deadline
    has not passed, or it would have been dropped; its horizon lies ahead), so only entries queued before
    can still go first. Calls whose deadlines are `horizon` or more away are served in arrival order among
    themselves and with calls without one. `horizon` 0: arrival order for all."""
    latest = arrived + horizon
    return latest if deadline is None else min(deadline, latest)


def chunk_end(sizes: Sequence[float], start: int, target: float) -> int:
    """End (exclusive) of the chunk of `sizes` that starts at `start`: the fewest consecutive items, at least
    one, whose sizes reach `target`; `len(sizes)` when the rest does not."""
    total = 0.0
    for i in range(start, len(sizes)):
        total += sizes[i]
        if total >= target:
            return i + 1
    return len(sizes)
