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

Owns: the slice bound (`slice_chars`: at most a quarter of the visibility timeout at FLOOR_TOKENS_PER_S, or
at the loaded model's measured rate over SAFETY if lower, and MAX_TOKENS_PER_CHAR; and at most a quarter of
it at the previous slice's observed characters/s over SAFETY; one item larger than that is a slice of its
own), the split (`slices`), and the hold (`Hold`: a compare-and-set renewal that tells this delivery's hold
from a later delivery's of the same tag, and says when it is lost). The chunks themselves, their layout and
their messages are unchanged: a slice is the worker's own unit of work, never stored or sent.
Must not know: Celery, torch, the model (`device` is a string, rates are passed in), the job store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import redis

from model.windows import MAX_TOKENS_PER_CHAR  # pure list arithmetic: no torch in the prefork parent

log = logging.getLogger(__name__)
T = TypeVar("T")

UNACKED_INDEX = "unacked_index"  # kombu's Redis transport: delivery tag -> when it was taken (epoch seconds)
# The slowest a worker process is assumed to classify, in tokens per second. CPU: the bundled model measured
# 3,910 (an SRE review) and 5,800-6,000 (the 2-core dev VM, 2026-11) on 2 threads: 4-6x margin. CUDA: an
# H100 measured 0.5-1.16M (docs/benchmarks.md): 10-20x. A slice takes at most a quarter of the visibility
# timeout at this rate, so a model up to 4x slower still renews in time.
FLOOR_TOKENS_PER_S = {"cpu": 1_000, "cuda": 50_000}
SLICE_SHARE = 4
# A measured rate (the loaded model's tokens/s at load, a slice's characters/s) counts at 1/SAFETY of itself:
# a probe is short, and the next slice's text can be slower than the last's (longer windows, more tokens a
# character, a busier host).
SAFETY = 2


def floor_tokens_per_s(device: str) -> int:
    return FLOOR_TOKENS_PER_S["cuda" if str(device).startswith("cuda") else "cpu"]


def assumed_tokens_per_s(device: str, measured_tokens_per_s: float | None = None) -> float:
    """The rate slices are sized for: the device's floor rate, or the loaded model's measured rate over
    SAFETY if that is lower (a checkpoint larger than the bundled one: ModernBERT-base runs 160-200 tokens/s
    on 2 CPU threads, far under the CPU floor). A measurement never raises it above the floor."""
    floor = float(floor_tokens_per_s(device))
    if measured_tokens_per_s is None or not measured_tokens_per_s > 0:
        return floor
    return min(floor, measured_tokens_per_s / SAFETY)


def slice_chars(
    visibility_timeout_s: float,
    device: str,
    tokens_per_s: float | None = None,
    chars_per_s: float | None = None,
) -> int:
    """Characters (texts and contexts) per slice: a quarter of the visibility timeout at the assumed token
    rate (`assumed_tokens_per_s`: the floor, or the measured `tokens_per_s` of the loaded model over SAFETY)
    and MAX_TOKENS_PER_CHAR; and no more than a quarter of the timeout at `chars_per_s` over SAFETY, the
    rate the previous slice of the chunk ran at, when known. The defaults with no measurement: 225,000 on a
    CPU (one slice for a chunk of 256 items of the traffic mix, ~800 characters each), 11,250,000 on CUDA
    (about 20 full batches)."""
    share = visibility_timeout_s / SLICE_SHARE
    budget = share * assumed_tokens_per_s(device, tokens_per_s) / MAX_TOKENS_PER_CHAR
    if chars_per_s is not None and chars_per_s > 0:
        budget = min(budget, share * chars_per_s / SAFETY)
    return max(1, int(budget))


def item_chars(item: dict[str, str]) -> int:
    """An item's characters, its text's and its context's."""
    return len(item.get("text") or "") + len(item.get("context") or "")


def slices(
    items: Sequence[T], chars: Callable[[T], int], max_chars: int | Callable[[], int]
) -> Iterator[list[T]]:
    """`items` in order, cut into consecutive runs of at most `max_chars` characters each (an item with more
    than that is a run of its own); every item in exactly one run. `max_chars` may be a callable, read
    as each run starts (lazily: after the caller has handled the run before), so a run is sized from what the
    runs before it measured."""
    bound = max_chars if callable(max_chars) else lambda: max_chars
    run: list[T] = []
    size, limit = 0, bound()
    for item in items:
        n = chars(item)
        if run and size + n > limit:
            yield run
            run, size, limit = [], 0, bound()
        run.append(item)
        size += n
    if run:
        yield run


def largest_item_s(max_text_chars: int, device: str, tokens_per_s: float | None = None) -> float:
    """Seconds the largest item (a text and a context of `max_text_chars` characters each) takes at the
    assumed rate (`assumed_tokens_per_s`): one slice can be no shorter, so this must stay under the
    visibility timeout."""
    return 2 * max_text_chars * MAX_TOKENS_PER_CHAR / assumed_tokens_per_s(device, tokens_per_s)


# ---- the hold ---------------------------------------------------------------------------------------------
# KEYS = [unacked_index]; ARGV = [delivery tag, the score this delivery last wrote ('' before its first
# renewal), when this delivery started, now]. Compare-and-set: kombu keeps a message's delivery tag when it
# restores and redelivers it, so the tag alone cannot tell this delivery's hold from a later one's. The score
# is renewed only if it is the one this delivery wrote last or, before its first renewal, kombu's stamp from
# when this worker received the message, which is no later than the delivery's start (a later stamp is
# another delivery's). -> 1 renewed; 0 the hold is lost (acknowledged, restored, or another delivery's).
RENEW_LUA = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s then return 0 end
s = tonumber(s)
if ARGV[2] ~= '' then
  if s ~= tonumber(ARGV[2]) then return 0 end
elseif s > tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[4], ARGV[1])
return 1
"""

HELD, LOST, FAILED, UNTRACKED = "held", "lost", "failed", "untracked"


def broker_redis_url(broker_url: str | None) -> str | None:
    """The Redis URL of a Celery broker URL that kombu's Redis transport serves (redis://, rediss://,
    unix://; the first of a `;`-separated failover list), or None: another broker (amqp://, sentinel://,
    memory://), whose visibility is not an `unacked_index` this worker can renew."""
    first = (broker_url or "").split(";")[0].strip()
    scheme = first.split("://", 1)[0].lower() if "://" in first else ""
    return first if scheme in ("redis", "rediss", "unix") else None


def unacked_index_key(transport_options: dict | None) -> str:
    """The name kombu's Redis transport gives `unacked_index` under these transport options (its
    `unacked_index_key` option, and the `global_keyprefix` it puts before every key)."""
    options = transport_options or {}
    return str(options.get("global_keyprefix") or "") + str(options.get("unacked_index_key") or UNACKED_INDEX)


class Hold:
    """One delivery's hold on its message in kombu's `unacked_index` (delivery tag -> when it was taken),
    renewed compare-and-set (`RENEW_LUA`). `client`: the broker's Redis (None: the broker is not Redis, or
    unknown); `started`: when this delivery started (this host's clock, as kombu stamps it)."""

    def __init__(
        self,
        client: redis.Redis | None,
        delivery_tag: str | None,
        started: float,
        key: str = UNACKED_INDEX,
    ) -> None:
        self.client, self.tag, self.started, self.key = client, delivery_tag, started, key
        self.last: float | None = None  # the score this delivery wrote last
        self.warned = False

    def renew(self, now: float | None = None) -> str:
        """Set the message's time in `unacked_index` to `now`, so the broker's sweep, which re-queues
        messages taken more than the visibility timeout ago, leaves it alone for another timeout. -> HELD;
        LOST: the message is not this delivery's any more (acknowledged, handed back, or restored and taken
        by another delivery, which keeps the tag): stop; FAILED: Redis failed (best effort: logged once,
        the hold may lapse as it did before renewals); UNTRACKED: no tag or no broker Redis (a call outside a
        worker, another broker)."""
        if not self.tag or self.client is None:
            return UNTRACKED
        when = time.time() if now is None else now
        last = "" if self.last is None else repr(self.last)
        try:
            held = self.client.eval(RENEW_LUA, 1, self.key, self.tag, last, repr(self.started), repr(when))
        except redis.RedisError as e:
            if not self.warned:
                self.warned = True
                log.warning(
                    "could not renew the hold on message %s (%s): %s; the chunk goes to another worker if it "
                    "outlasts the visibility timeout", self.tag, self.key, e,
                )  # fmt: skip
            return FAILED
        if not held:
            return LOST
        self.last = float(when)
        return HELD
