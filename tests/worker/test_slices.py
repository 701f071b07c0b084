"""Slices of a chunk (worker/slices.py): the bound and the split as plain functions, the hold renewal against
a real Redis and kombu's own sweep of unacknowledged messages, and what `deliver` stores slice by slice."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import Reject

from tests.worker.harness import RedisServer, free_port, make_items
from worker.app import create_app
from worker.jobs import JobClient
from worker.metrics import Metrics
from worker.settings import WorkerSettings
from worker.slices import (
    MAX_TOKENS_PER_CHAR,
    UNACKED_INDEX,
    item_chars,
    largest_item_s,
    renew,
    slice_chars,
    slices,
)
from worker.store import JobKeys
from worker.tasks import deliver, visibility_warning


# ---- the bound and the split ------------------------------------------------------------------------------
def test_a_slice_is_a_quarter_of_the_visibility_timeout_at_the_floor_rate() -> None:
    assert slice_chars(3600, "cpu") == 225_000  # 900 s at 1,000 tokens/s and 4 tokens a character
    assert slice_chars(3600, "cuda") == slice_chars(3600, "cuda:1") == 11_250_000  # 50,000 tokens/s
    assert slice_chars(7200, "cpu") == 2 * slice_chars(3600, "cpu")
    assert slice_chars(1, "cpu") == 62 and slice_chars(0.001, "cpu") == 1  # never zero


def test_the_largest_item_takes_well_under_the_default_visibility_timeout_at_the_floor_rate() -> None:
    """One item is never split: a text and a context of 200,000 characters, 1.6M tokens at most, 1,600 s at
    1,000 tokens/s on a CPU, under the default visibility timeout (3,600 s)."""
    assert largest_item_s(200_000, "cpu") == 1600 < WorkerSettings().visibility_timeout_s
    assert largest_item_s(200_000, "cuda") == 32


def test_a_worker_warns_when_the_largest_item_could_outlast_the_visibility_timeout() -> None:
    assert visibility_warning(WorkerSettings(), "cpu") is None  # 1,600 s < 3,600 s
    assert visibility_warning(WorkerSettings(visibility_timeout_s=600), "cuda") is None  # 32 s
    warning = visibility_warning(WorkerSettings(visibility_timeout_s=600), "cpu")
    assert warning and warning.startswith("SAFETY_VISIBILITY_TIMEOUT_S=600 is below the 1600s"), warning
    assert visibility_warning(WorkerSettings(visibility_timeout_s=600, max_text_chars=50_000), "cpu") is None


def test_the_tokens_per_character_bound_is_the_engines() -> None:
    from model.classifier import MAX_TOKENS_PER_CHAR as engines

    assert MAX_TOKENS_PER_CHAR == engines


def test_slices_are_consecutive_runs_under_the_bound() -> None:
    sizes = [3, 4, 2, 10, 1, 1, 5]
    runs = list(slices(list(range(len(sizes))), lambda i: sizes[i], 6))
    assert runs == [[0], [1, 2], [3], [4, 5], [6]]  # 10 > 6: alone; every item once, in order
    assert list(slices([], len, 6)) == []
    assert list(slices(["ab", "cd"], len, 100)) == [["ab", "cd"]]
    assert item_chars({"text": "abc", "context": "de"}) == 5 and item_chars({"text": "abc"}) == 3
    assert item_chars({"text": "abc", "context": None}) == 3


# ---- the renewal ------------------------------------------------------------------------------------------
def test_renew_moves_a_held_message_to_now_and_touches_nothing_else(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.zadd(UNACKED_INDEX, {"held": 100.0})
    assert renew(r, "held", now=5000.0) is True
    assert r.zscore(UNACKED_INDEX, "held") == 5000.0
    assert renew(r, "acked", now=5000.0) is False  # not held (acknowledged, or handed back): not put back
    assert r.zscore(UNACKED_INDEX, "acked") is None
    assert renew(r, None) is False and renew(r, "") is False  # no tag: a call outside a worker
    down = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    assert renew(down, "held") is False  # best effort: Redis down is logged, never raised


# ---- deliver, slice by slice ------------------------------------------------------------------------------
class Slow:
    """The real classifier, `per_item` seconds slower an item: a CPU chunk of large texts, in miniature."""

    def __init__(self, clf: Any, per_item: float) -> None:
        self.clf, self.per_item, self.name, self.device = clf, per_item, clf.name, "cpu"
        self.calls: list[int] = []

    def classify(self, items: list[dict[str, str]]) -> Any:
        self.calls.append(len(items))
        time.sleep(self.per_item * len(items))
        return self.clf.classify(items)


class FailsSecondCall(Slow):
    def classify(self, items: list[dict[str, str]]) -> Any:
        if len(self.calls) == 1:
            self.calls.append(len(items))
            raise RuntimeError("the second slice failed")
        return super().classify(items)


def long_items(n: int, chars: int = 200) -> list[dict[str, str]]:
    return [
        {**item, "text": (item["text"] + " ") * (chars // len(item["text"]) + 1)} for item in make_items(n)
    ]


@contextmanager
def kombu_sweeping(app: Any, every_s: float = 0.2) -> Iterator[None]:
    """Another worker's kombu doing what it does every few seconds: re-queue the unacknowledged messages
    taken more than the visibility timeout ago (`restore_visible`, kombu's own code)."""
    stop = threading.Event()

    def sweep() -> None:
        with app.connection_for_write() as conn:
            qos = conn.default_channel.qos
            while not stop.wait(every_s):
                qos.restore_visible(start=0, num=100, interval=1)

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def test_a_chunk_longer_than_the_visibility_timeout_keeps_its_message(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """A CPU chunk of large texts outlasted the visibility timeout, and kombu handed its message to another
    worker while the first still classified it (twice the work, an attempt counted; with enough workers,
    given up). Each slice now renews the hold: the message stays this worker's, however long the chunk."""
    settings = WorkerSettings(redis_url=redis_server.url, queue="hold", chunk_size=6, visibility_timeout_s=2)
    client = job_client(redis_server.url, queue="hold", chunk_size=6, visibility_timeout_s=2)
    job = client.submit(long_items(6), job_id="long-chunk").status.job_id
    assert slice_chars(2, "cpu") < item_chars(long_items(1)[0])  # one item a slice
    app = create_app(settings)
    with app.connection_for_write() as conn:
        message = conn.SimpleQueue("hold", no_ack=False).get(timeout=5)  # taken, as a worker takes it
        tag = message.delivery_tag
        r = redis_server.client()
        assert r.zscore(UNACKED_INDEX, tag) is not None and r.llen("hold") == 0
        slow = Slow(tiny_classifier, per_item=0.6)  # 3.6 s in all, 0.6 s a slice
        task = SimpleNamespace(
            settings=settings, store=client.store, metrics=Metrics(), classifier=slow,
            request=SimpleNamespace(properties={"delivery_tag": tag}),
        )  # fmt: skip
        with kombu_sweeping(app):
            assert deliver(task, job, 0)["action"] == "classified"
        assert r.llen("hold") == 0, "the broker handed the running chunk to another worker"
        assert r.hexists("unacked", tag), "the message is still this worker's, unacknowledged"
        assert slow.calls == [1] * 6
        message.ack()
    status = client.status(job)
    assert (status.state, status.done) == ("done", 6)
    assert int(r.hget(JobKeys(job).attempts, "0")) == 1


def test_a_delivery_that_fails_midway_keeps_the_slices_it_stored(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """Results are stored slice by slice: a delivery that fails (or a worker killed) after its first slice
    leaves that slice's results, the next delivery classifies only the rest, and the metrics count each
    item once, in the delivery that wrote it."""
    client = job_client(redis_server.url, queue="partial-unconsumed", chunk_size=4)
    job = client.submit(long_items(4), job_id="partial").status.job_id
    settings = WorkerSettings(max_attempts=3, visibility_timeout_s=2)  # 125 characters a slice: one item
    metrics = Metrics()
    task = SimpleNamespace(settings=settings, store=client.store, metrics=metrics)
    failing = FailsSecondCall(tiny_classifier, per_item=0)
    with pytest.raises(Reject, match="the second slice failed"):
        deliver(SimpleNamespace(**vars(task), classifier=failing), job, 0)
    assert client.status(job).done == 1  # the first slice is stored
    again = Slow(tiny_classifier, per_item=0)
    assert deliver(SimpleNamespace(**vars(task), classifier=again), job, 0)["ok"] == 3
    assert again.calls == [1, 1, 1]  # only what the failed delivery left
    status = client.status(job)
    assert (status.state, status.done, status.failed) == ("done", 4, 0)
    get = metrics.registry.get_sample_value
    assert get("safety_worker_items_total", {"outcome": "ok"}) == 4
    assert (
        get("safety_worker_chunks_total", {"outcome": "retried"}),
        get("safety_worker_chunks_total", {"outcome": "done"}),
    ) == (1, 1)
