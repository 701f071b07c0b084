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
    FAILED,
    HELD,
    LOST,
    MAX_TOKENS_PER_CHAR,
    UNACKED_INDEX,
    UNTRACKED,
    Hold,
    broker_redis_url,
    item_chars,
    largest_item_s,
    slice_chars,
    slices,
    unacked_index_key,
)
from worker.store import JobKeys
from worker.tasks import broker_warning, deliver, visibility_warning


def delivering(
    settings: WorkerSettings, client: Any, classifier: Any, app: Any, tag: str, metrics: Metrics, **more: Any
) -> SimpleNamespace:
    """What `deliver` needs of a task: a worker's, whose chunk message has the delivery `tag`."""
    return SimpleNamespace(
        settings=settings, store=client.store, metrics=metrics, classifier=classifier, app=app,
        request=SimpleNamespace(properties={"delivery_tag": tag}), **more,
    )  # fmt: skip


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


def test_a_slow_model_gets_slices_sized_from_its_measured_rate() -> None:
    """A ModernBERT-base-size checkpoint runs ~180 tokens/s on 2 CPU threads, far under the CPU floor (1,000):
    a floor-sized slice of CJK text (225,000 characters, ~675,000 tokens) took longer than the timeout. The
    measured rate, over the safety factor of 2, sizes the slices when it is lower than the floor."""
    assert slice_chars(3600, "cpu", tokens_per_s=180) == 20_250  # 900 s at 90 tokens/s, 4 a character
    assert slice_chars(3600, "cpu", tokens_per_s=180) * 3 / 180 < 3600 / 2  # CJK: 3 tokens a character
    assert slice_chars(3600, "cpu", tokens_per_s=1e6) == slice_chars(3600, "cpu") == 225_000  # never above
    assert slice_chars(3600, "cpu", tokens_per_s=0) == slice_chars(3600, "cpu", tokens_per_s=None) == 225_000
    # the slice before ran at 100 characters/s: the next is at most 900 s of that over 2
    assert slice_chars(3600, "cpu", chars_per_s=100) == 45_000
    assert slice_chars(3600, "cpu", tokens_per_s=180, chars_per_s=1e9) == 20_250  # the smaller bound wins
    assert largest_item_s(200_000, "cpu", tokens_per_s=180) == 1_600_000 / 90
    assert largest_item_s(200_000, "cpu", tokens_per_s=1e6) == largest_item_s(200_000, "cpu") == 1600


def test_the_visibility_warning_uses_the_measured_rate() -> None:
    assert visibility_warning(WorkerSettings(), "cpu", 3_400) is None  # the bundled model: the floor
    warning = visibility_warning(WorkerSettings(), "cpu", 180)  # 1.6M tokens at 90/s: 17,778 s
    assert warning and warning.startswith("SAFETY_VISIBILITY_TIMEOUT_S=3600 is below the 17778s"), warning
    assert "at 90 tokens/s" in warning


def test_each_slice_is_sized_as_it_starts() -> None:
    """The bound is read as each run starts, after the caller handled the run before (a generator)."""
    bounds = iter([8, 3, 1])
    runs = slices(list(range(12)), lambda _: 1, lambda: next(bounds, 100))
    assert [len(r) for r in runs] == [8, 3, 1]


def test_the_broker_url_and_unacked_index_key() -> None:
    assert broker_redis_url("redis://h:1/3") == "redis://h:1/3"
    assert broker_redis_url("rediss://h:1/0;redis://g:1/0") == "rediss://h:1/0"
    assert broker_redis_url("amqp://guest@h//") is None and broker_redis_url(None) is None
    assert broker_redis_url("sentinel://h:26379") is None
    assert unacked_index_key(None) == UNACKED_INDEX
    assert unacked_index_key({"global_keyprefix": "p:", "unacked_index_key": "u"}) == "p:u"
    amqp = create_app(WorkerSettings())
    amqp.conf.broker_url = "amqp://guest@localhost//"
    assert "is not Redis" in (broker_warning(amqp) or "")
    assert broker_warning(create_app(WorkerSettings())) is None


# ---- the hold ---------------------------------------------------------------------------------------------
def test_the_hold_is_renewed_only_while_it_is_this_deliverys(redis_server: RedisServer) -> None:
    """kombu keeps a message's delivery tag when it restores and redelivers it: a renewal by tag alone (ZADD
    XX) renewed the new holder's entry, and the stale worker kept classifying. Compare-and-set: the first
    renewal needs kombu's stamp from before this delivery started, each later one the score it wrote."""
    r = redis_server.client()
    client = redis.Redis(port=redis_server.port)
    r.zadd(UNACKED_INDEX, {"t": 100.0})  # kombu stamped it at receipt
    hold = Hold(client, "t", started=101.0)
    assert hold.renew(now=200.0) == HELD and r.zscore(UNACKED_INDEX, "t") == 200.0
    assert hold.renew(now=300.5) == HELD and r.zscore(UNACKED_INDEX, "t") == 300.5
    r.zadd(UNACKED_INDEX, {"t": 350.0})  # restored, taken again by another delivery: its stamp
    assert hold.renew(now=400.0) == LOST and r.zscore(UNACKED_INDEX, "t") == 350.0  # untouched
    # a delivery that starts after another took its message: the stamp is later than its start
    assert Hold(client, "t", started=340.0).renew(now=400.0) == LOST and r.zscore(UNACKED_INDEX, "t") == 350.0
    assert Hold(client, "gone", started=1e12).renew() == LOST  # acknowledged or handed back: not put back
    assert r.zscore(UNACKED_INDEX, "gone") is None
    assert Hold(client, None, 0).renew() == Hold(None, "t", 0).renew() == UNTRACKED
    down = Hold(redis.Redis(port=free_port(), socket_connect_timeout=0.5), "t", started=1e12)
    assert down.renew() == FAILED and down.renew() == FAILED and down.warned  # logged once, never raised


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


def sized_items(n: int, chars: int) -> list[dict[str, str]]:
    """`n` items of exactly `chars` characters each (no context)."""
    return [{**item, "text": item["text"][:chars], "context": ""} for item in long_items(n, chars)]


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
        task = delivering(settings, client, slow, app, tag, metrics=Metrics())
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


class PerChar(Slow):
    """The real classifier, `per_char` seconds a character: a model slower than the floor rate."""

    def __init__(self, clf: Any, per_char: float, on_call: Callable[[int], None] | None = None) -> None:
        super().__init__(clf, per_item=0)
        self.per_char, self.on_call = per_char, on_call

    def classify(self, items: list[dict[str, str]]) -> Any:
        if self.on_call is not None:
            self.on_call(len(self.calls))
        time.sleep(self.per_char * sum(item_chars(i) for i in items))
        return super().classify(items)


@contextmanager
def taken(redis_server: RedisServer, settings: WorkerSettings, db: int = 0) -> Iterator[tuple[Any, Any, str]]:
    """The job's chunk 0 message taken from the queue by the app of `settings` (broker on Redis DB `db`; the
    job store stays on DB 0), as a worker takes it: -> (app, message, delivery tag)."""
    app = create_app(settings)
    if db:
        broker = f"redis://127.0.0.1:{redis_server.port}/{db}"
        app.conf.broker_url = broker
        store, other = redis_server.client(), redis.Redis.from_url(broker)
        while (raw := store.rpop(settings.queue)) is not None:  # the chunk messages, onto the other broker
            other.lpush(settings.queue, raw)
    with app.connection_for_write() as conn:
        message = conn.SimpleQueue(settings.queue, no_ack=False).get(timeout=5)
        yield app, message, message.delivery_tag


def test_a_slow_model_keeps_its_message_with_slices_from_its_measured_rate(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """A model slower than the floor rate: floor-sized slices (two items, 2.4 s here) outlasted the visibility
    timeout (2 s) and kombu handed the chunk to another worker while it ran. Slices sized from the model's
    measured rate (one item, 1.2 s) keep it."""
    settings = WorkerSettings(
        redis_url=redis_server.url, queue="slowmodel", chunk_size=4, visibility_timeout_s=2
    )
    client = job_client(redis_server.url, queue="slowmodel", chunk_size=4, visibility_timeout_s=2)
    items = sized_items(4, 60)
    assert {item_chars(i) for i in items} == {60} and slice_chars(2, "cpu") == 125  # floor: 2 items
    job = client.submit(items, job_id="slow-model").status.job_id
    r = redis_server.client()
    with taken(redis_server, settings) as (app, message, tag):
        slow = PerChar(tiny_classifier, per_char=0.02)  # 50 characters/s: 200 tokens/s at most
        task = delivering(settings, client, slow, app, tag, metrics=Metrics(), tokens_per_s=200.0)
        with kombu_sweeping(app):
            assert deliver(task, job, 0)["action"] == "classified"
        assert r.llen("slowmodel") == 0, "the broker handed the running chunk to another worker"
        assert slow.calls == [1, 1, 1, 1]
        message.ack()
    assert int(r.hget(JobKeys(job).attempts, "0")) == 1


def test_slices_adapt_to_the_rate_the_slice_before_ran_at(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """No measurement at load (or a wrong one): the first slice is floor-sized (8 items here); it ran at ~200
    characters/s, so the next is at most a quarter of the timeout at half that (200 characters: 3 items)."""
    client = job_client(redis_server.url, queue="adapt-unconsumed", chunk_size=12)
    job = client.submit(sized_items(12, 60), job_id="adapt").status.job_id
    slow = PerChar(tiny_classifier, per_char=0.005)
    task = SimpleNamespace(
        settings=WorkerSettings(visibility_timeout_s=8),
        store=client.store,
        metrics=Metrics(),
        classifier=slow,
    )
    assert slice_chars(8, "cpu") == 500
    assert deliver(task, job, 0)["action"] == "classified"
    assert slow.calls[0] == 8 and max(slow.calls[1:]) <= 3 and sum(slow.calls) == 12, slow.calls


def test_a_delivery_that_lost_its_hold_stops_and_leaves_the_new_holders_alone(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """A slice outlasted the visibility timeout: kombu restored the message and another worker took it, with
    the same delivery tag. The first worker renewed the new holder's entry (ZADD XX) and classified on. Now
    it sees the hold is not its own, stops, keeps the slice it stored, and leaves the new holder's entry."""
    settings = WorkerSettings(redis_url=redis_server.url, queue="lost", chunk_size=3, visibility_timeout_s=2)
    client = job_client(redis_server.url, queue="lost", chunk_size=3, visibility_timeout_s=2)
    job = client.submit(long_items(3), job_id="lost-hold").status.job_id
    r = redis_server.client()
    with taken(redis_server, settings) as (app, _, tag), app.connection_for_write() as conn:
        second: list[Any] = []

        def handed_over(call: int) -> None:  # in the first slice: the sweep restores it, a worker takes it
            if call == 0:  # (`conn` stays open: the new holder's channel keeps its message unacknowledged)
                conn.default_channel.qos.restore_by_tag(tag)
                time.sleep(0.01)
                second.append(conn.SimpleQueue("lost", no_ack=False).get(timeout=5))

        slow = PerChar(tiny_classifier, per_char=0, on_call=handed_over)
        metrics = Metrics()
        task = delivering(settings, client, slow, app, tag, metrics=metrics)
        assert deliver(task, job, 0)["action"] == "lost_hold"
        assert second and second[0].delivery_tag == tag  # kombu kept the tag
        stamp = r.zscore(UNACKED_INDEX, tag)
        assert slow.calls == [1], "the delivery that lost its hold classified on"
        assert stamp is not None and r.hexists("unacked", tag)
        assert r.zscore(UNACKED_INDEX, tag) == stamp  # the new holder's stamp, not renewed by the old
        assert client.status(job).done == 1  # the slice it stored stays
        get = metrics.registry.get_sample_value
        assert get("safety_worker_chunks_total", {"outcome": "lost_hold"}) == 1


def test_a_cancelled_job_stops_the_chunk_before_its_next_slice(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """The job's state was checked only when a slice's results were written: a job cancelled after one
    slice's write cost the whole next slice. Now it is read before each slice. (A cancel that lands while a
    slice runs is still seen when that slice ends: `classify` is not interrupted.)"""
    client = job_client(redis_server.url, queue="cancel-unconsumed", chunk_size=3)
    job = client.submit(long_items(3), job_id="cancel-midway").status.job_id

    class CancelledAfterFirstWrite:
        def __getattr__(self, name: str) -> Any:
            return getattr(client.store, name)

        def write(self, *args: Any, **kwargs: Any) -> Any:
            written = client.store.write(*args, **kwargs)
            client.cancel(job)  # the user cancels right after the first slice is stored
            return written

    slow = PerChar(tiny_classifier, per_char=0)
    task = SimpleNamespace(
        settings=WorkerSettings(visibility_timeout_s=2), store=CancelledAfterFirstWrite(), metrics=Metrics(),
        classifier=slow,
    )  # fmt: skip
    assert deliver(task, job, 0)["action"] == "cancelled"
    assert slow.calls == [1], "a slice was classified after the job was cancelled"
    assert client.status(job).done == 1


def test_the_hold_is_renewed_on_the_apps_broker_not_the_job_store(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """CELERY_BROKER_URL (or the app's config) can put the broker elsewhere than SAFETY_REDIS_URL: the
    renewal went to the job store's Redis, did nothing, and the broker handed the running chunk on."""
    settings = WorkerSettings(
        redis_url=redis_server.url, queue="elsewhere", chunk_size=6, visibility_timeout_s=2
    )
    client = job_client(redis_server.url, queue="elsewhere", chunk_size=6, visibility_timeout_s=2)
    job = client.submit(long_items(6), job_id="broker-elsewhere").status.job_id
    broker = redis.Redis(port=redis_server.port, db=3)
    with taken(redis_server, settings, db=3) as (app, message, tag):
        assert broker.zscore(UNACKED_INDEX, tag) is not None
        slow = Slow(tiny_classifier, per_item=0.6)  # 3.6 s in all, 0.6 s a slice
        task = delivering(settings, client, slow, app, tag, metrics=Metrics())
        with kombu_sweeping(app):
            assert deliver(task, job, 0)["action"] == "classified"
        assert broker.llen("elsewhere") == 0, "the broker handed the running chunk to another worker"
        assert slow.calls == [1] * 6
        message.ack()


def test_the_loaded_model_is_timed(tiny_classifier: Any) -> None:
    """What the worker measures once its model is loaded: tokens/s of a full-length window."""
    from worker.tasks import measure_tokens_per_s

    rate = measure_tokens_per_s(tiny_classifier)
    assert rate is not None and rate > 100
    assert measure_tokens_per_s(SimpleNamespace()) is None  # a failed probe: the floor rate alone
