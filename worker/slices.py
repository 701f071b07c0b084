"""Slices of a chunk: a worker classifies a chunk a slice at a time, stores each slice's results as soon as it
has them, and renews its hold on the chunk's message before each slice.

Why: the broker hands an unacknowledged message to another worker once it was taken more than the visibility
timeout ago (kombu's Redis transport: `unacked_index`, delivery tag -> when it was taken; its
`restore_visible` re-queues the older ones). A chunk of large texts on a CPU can run longer than that (256
texts of 200,000 characters: ~22M tokens, about 1.5 h at 3,910 tokens/s), and was then delivered again
while it still ran: classified twice, an attempt counted, and with enough workers given up and failed
though nothing was wrong. Now the hold is renewed (the message's time in `unacked_index` set to now) after
every slice, so a live worker that makes progress keeps its chunk however long the chunk is, and a worker
that stops making progress (dead, or hung inside a slice) stops renewing: its chunk comes back one
visibility timeout after its last renewal, as before. And a chunk that comes back (a killed worker, an
expired hold) redoes only the slices whose results were not stored.

Owns: the slice bound (`slice_chars`: at most a quarter of the visibility timeout at FLOOR_TOKENS_PER_S and
MAX_TOKENS_PER_CHAR; one item larger than that is a slice of its own), the split (`slices`), and the
renewal (`renew`). The chunks themselves, their layout and their messages are unchanged: a slice is the
worker's own unit of work, never stored or sent. Must not know: Celery, torch, the model (`device` is a
string), the job store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import redis

log = logging.getLogger(__name__)
T = TypeVar("T")

UNACKED_INDEX = "unacked_index"  # kombu's Redis transport: delivery tag -> when it was taken (epoch seconds)
# The most tokens one character makes (byte-level BPE: emoji, rare CJK characters); model/classifier.py's
# MAX_TOKENS_PER_CHAR (not imported: this module runs in the prefork parent, which never imports torch).
MAX_TOKENS_PER_CHAR = 4
# The slowest a worker process is assumed to classify, in tokens per second. CPU: the bundled model measured
# 3,910 (an SRE review) and 5,800-6,000 (the 2-core dev VM, 2026-11) on 2 threads: 4-6x margin. CUDA: an
# H100 measured 0.5-1.16M (docs/benchmarks.md): 10-20x. A slice takes at most a quarter of the visibility
# timeout at this rate, so a model up to 4x slower still renews in time.
FLOOR_TOKENS_PER_S = {"cpu": 1_000, "cuda": 50_000}
SLICE_SHARE = 4


def floor_tokens_per_s(device: str) -> int:
    return FLOOR_TOKENS_PER_S["cuda" if str(device).startswith("cuda") else "cpu"]


def slice_chars(visibility_timeout_s: float, device: str) -> int:
    """Characters (texts and contexts) per slice: a quarter of the visibility timeout at the device's floor
    rate and MAX_TOKENS_PER_CHAR. The defaults: 225,000 on a CPU (one slice for a chunk of 256 items of the
    traffic mix, ~800 characters each), 11,250,000 on CUDA (about 20 full batches)."""
    budget = visibility_timeout_s / SLICE_SHARE * floor_tokens_per_s(device) / MAX_TOKENS_PER_CHAR
    return max(1, int(budget))


def item_chars(item: dict[str, str]) -> int:
    """An item's characters, its text's and its context's."""
    return len(item.get("text") or "") + len(item.get("context") or "")


def slices(items: Sequence[T], chars: Callable[[T], int], max_chars: int) -> Iterator[list[T]]:
    """`items` in order, cut into consecutive runs of at most `max_chars` characters each (an item with more
    than that is a run of its own); every item in exactly one run."""
    run: list[T] = []
    size = 0
    for item in items:
        n = chars(item)
        if run and size + n > max_chars:
            yield run
            run, size = [], 0
        run.append(item)
        size += n
    if run:
        yield run


def largest_item_s(max_text_chars: int, device: str) -> float:
    """Seconds the largest item (a text and a context of `max_text_chars` characters each) takes at the
    device's floor rate: one slice can be no shorter, so this must stay under the visibility timeout."""
    return 2 * max_text_chars * MAX_TOKENS_PER_CHAR / floor_tokens_per_s(device)


def renew(client: redis.Redis, delivery_tag: str | None, now: float | None = None) -> bool:
    """Renew this worker's hold on the message `delivery_tag`: its time in kombu's `unacked_index` becomes
    `now` (this host's clock, as kombu stamps it), so the broker's sweep, which re-queues messages taken more
    than the visibility timeout ago, leaves it alone for another timeout. Only a message still held is
    touched (ZADD XX): one already acknowledged or handed back stays so. Best effort: a Redis error is
    logged, and the hold then lapses as it did before renewals. -> whether the message was held."""
    if not delivery_tag:
        return False
    when = time.time() if now is None else now
    try:
        changed = client.zadd(UNACKED_INDEX, {delivery_tag: when}, xx=True, ch=True)
    except redis.RedisError as e:
        log.warning("could not renew the hold on message %s: %s", delivery_tag, e)
        return False
    return bool(changed)
