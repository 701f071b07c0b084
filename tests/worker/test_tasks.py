"""The chunk task in process: its classification step, and the metrics of each delivery against a real Redis
(the worker-process behaviour is in test_worker_*)."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import Reject

from model.errors import InvalidInputError, NotFoundError
from model.items import BLANK
from tests.worker.harness import RedisServer, assert_job_output, expected_lines, free_port, make_items, poll
from worker.jobs import JobClient
from worker.metrics import Metrics
from worker.settings import WorkerSettings
from worker.store import RESULT_FIELDS, JobKeys, JobStore, failed_line
from worker.tasks import classify_lines, deliver


def test_result_lines_have_the_classify_shape_plus_index_and_error(tiny_classifier: Any) -> None:
    (result,) = tiny_classifier.classify([{"text": "hello"}])
    assert tuple(result.to_dict()) == RESULT_FIELDS
    assert failed_line(3, "a", "why").keys() == {"index", "error", *RESULT_FIELDS}


def test_an_item_the_engine_refuses_fails_alone(tiny_classifier: Any) -> None:
    items = [{"text": "first", "id": "a"}, {"text": "   ", "id": "b"}, {"text": "third", "id": "c"}]
    lines = sorted(classify_lines(tiny_classifier, [10, 11, 12], items), key=lambda x: x[0])
    assert [(i, failed) for i, _, failed in lines] == [(10, False), (11, True), (12, False)]
    assert lines[1][1] == failed_line(11, "b", f"items[11].text: {BLANK}")
    want = [r.to_dict() for r in tiny_classifier.classify([items[0], items[2]])]
    assert [lines[0][1], lines[2][1]] == [
        {"index": 10, **want[0], "error": None},
        {"index": 12, **want[1], "error": None},
    ]


class RefusesFirstItem:
    """A classifier whose engine refuses the first item of its first call (as for a bad item)."""

    def __init__(self, clf: Any) -> None:
        self.clf, self.name, self.calls = clf, clf.name, 0

    def classify(self, items: list[dict[str, str]]) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise InvalidInputError("refused", index=0, field="text")
        return self.clf.classify(items)


class Broken:
    name = "broken"

    def classify(self, items: list[dict[str, str]]) -> Any:
        raise RuntimeError("the device fell over")


def test_an_item_without_an_id_is_named_by_its_index_in_the_job(tiny_classifier: Any) -> None:
    """As Classify and SubmitJob name it: the index in the job, not in the chunk (the engine's own numbering
    starts at each chunk's first item)."""
    items = [{"text": "first"}, {"text": "  "}, {"text": "third", "id": ""}, {"text": "fourth", "id": "d"}]
    lines = sorted(classify_lines(tiny_classifier, [256, 257, 258, 259], items), key=lambda x: x[0])
    assert [line["id"] for _, line, _ in lines] == ["256", "257", "258", "d"]


def test_each_delivery_is_counted_by_outcome_and_items_once(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """deliver() in process against a real Redis, with the classifier swapped per delivery."""
    client = job_client(redis_server.url, queue="metrics-unconsumed", chunk_size=2)
    job = client.submit(make_items(6, prefix="m"), job_id="metrics-job").status.job_id
    metrics = Metrics()
    task = SimpleNamespace(settings=WorkerSettings(max_attempts=2), store=client.store, metrics=metrics)

    def run(chunk: int, classifier: Any, **overrides: Any) -> dict[str, Any]:
        return deliver(SimpleNamespace(**{**vars(task), "classifier": classifier, **overrides}), job, chunk)

    def chunks(outcome: str) -> float:
        return metrics.registry.get_sample_value("safety_worker_chunks_total", {"outcome": outcome})

    def items(outcome: str) -> float:
        return metrics.registry.get_sample_value("safety_worker_items_total", {"outcome": outcome})

    assert run(0, tiny_classifier)["action"] == "classified"
    assert (chunks("done"), items("ok"), items("failed")) == (1, 2, 0)
    assert run(0, tiny_classifier)["action"] == "complete"  # a redelivery after the write: nothing to do
    assert (chunks("done"), chunks("skipped"), items("ok")) == (1, 1, 2)

    assert run(1, RefusesFirstItem(tiny_classifier))["action"] == "classified"  # one item fails alone
    assert (chunks("done"), items("ok"), items("failed")) == (2, 3, 1)

    with pytest.raises(Reject):  # attempt 1 of 2: back to the queue
        run(2, Broken())
    assert (chunks("retried"), items("failed")) == (1, 1)
    assert run(2, Broken())["action"] == "dead-lettered"  # attempt 2 of 2: its items fail
    assert (chunks("dead_lettered"), items("failed")) == (1, 3)

    unreachable = JobStore(redis.Redis(port=free_port(), socket_connect_timeout=1))
    with pytest.raises(Reject):  # an unexpected error (Redis down) also hands the chunk back
        run(0, tiny_classifier, store=unreachable)
    assert chunks("retried") == 2

    status = client.status(job)
    assert (status.state, status.done, status.failed) == ("done", 3, 3)  # the counts agree with the job
    assert (items("ok"), items("failed")) == (status.done, status.failed)
    # Every delivery that did work is timed (done 2, retried 2, dead-lettered 1); a skipped one is not.
    assert metrics.registry.get_sample_value("safety_worker_chunk_seconds_count") == 5


def test_a_submit_stops_when_redis_lost_the_job_and_a_new_one_starts_clean(
    redis_server: RedisServer, job_client: Callable[..., JobClient]
) -> None:
    """Redis restarted without persistence in the middle of a submit: the rest of the submit must not
    recreate the job's items and sent chunks, and the re-submit must not take those left over for its own
    (it skipped their chunks, and the job stayed `running` for ever)."""
    client = job_client(redis_server.url, queue="lost-unconsumed", chunk_size=2)
    r = redis_server.client()
    keys = JobKeys("lost-job")
    r.hset(keys.items, "0", "stale")  # what a lost job's submit left behind
    r.sadd(keys.enqueued, 0, 1)
    r.hset(keys.attempts, "0", 19)
    submitted = client.submit(make_items(6, prefix="l"), job_id="lost-job")
    assert (submitted.resumed, submitted.sent) == (False, 3)  # every chunk, none skipped
    assert r.hget(keys.attempts, "0") is None and r.hget(keys.items, "0") != "stale"

    r.delete(keys.job)  # the record is gone (the restart), the submit goes on
    with pytest.raises(NotFoundError, match="disappeared while it was being submitted"):
        client.store.upload("lost-job", 0, b"x\n")
    with pytest.raises(NotFoundError, match="disappeared"):
        client.store.mark_enqueued("lost-job", 0)


def test_a_chunk_whose_items_are_missing_from_an_open_job_fails_them_instead_of_looping(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """No redelivery brings the items back: the chunk's items fail at once with the reason (before, the
    chunk said `gone` while its job stayed open, and the lost-chunk sweeper re-sent it for ever)."""
    client = job_client(redis_server.url, queue="missing-unconsumed", chunk_size=2)
    job = client.submit(make_items(4, prefix="g"), job_id="missing-items").status.job_id
    redis_server.client().hdel(JobKeys(job).items, "2")  # chunk 1 loses an item
    task = SimpleNamespace(
        settings=WorkerSettings(max_attempts=3),
        store=client.store,
        metrics=Metrics(),
        classifier=tiny_classifier,
    )
    assert deliver(task, job, 0)["action"] == "classified"
    assert deliver(task, job, 1)["action"] == "dead-lettered"
    status = client.status(job)
    assert (status.state, status.done, status.failed) == ("done", 2, 2)
    lines = list(client.results(job, timeout=10))
    assert [line["error"] is None for line in lines] == [True, True, False, False]
    assert "items are missing from Redis" in lines[2]["error"]
    assert [line["id"] for line in lines] == ["g-0", "g-1", "2", "g-3"]  # the lost item: its index


class BlipOnce(JobStore):
    """The real store, whose next write fails once as if Redis dropped the connection."""

    blips = 1

    def write(self, *args: Any, **kwargs: Any) -> Any:
        if self.blips:
            self.blips -= 1
            raise redis.ConnectionError("blip")
        return super().write(*args, **kwargs)


def test_a_give_up_interrupted_by_redis_is_done_again_once_naming_the_real_cause(
    redis_server: RedisServer, job_client: Callable[..., JobClient]
) -> None:
    client = job_client(redis_server.url, queue="blip-unconsumed", chunk_size=3)
    job = client.submit(make_items(3, prefix="b"), job_id="blip-job").status.job_id
    store = BlipOnce(client.store.client)
    task = SimpleNamespace(
        settings=WorkerSettings(max_attempts=1), store=store, metrics=Metrics(), classifier=Broken()
    )
    before = len(store.dead_letters(10_000))
    with pytest.raises(Reject):  # the give-up's write failed: the chunk goes back to the queue
        deliver(task, job, 0)
    assert len(store.dead_letters(10_000)) == before  # nothing dead-lettered without its items written
    assert deliver(task, job, 0)["action"] == "dead-lettered"  # the redelivery gives up again
    entries = [e for e in store.dead_letters(10_000) if e["job_id"] == job]
    assert len(entries) == 1 and entries[0]["error"].endswith("RuntimeError: the device fell over")
    lines = list(client.results(job, timeout=5))
    assert [line["error"] for line in lines] == [entries[0]["error"]] * 3
    assert client.status(job).state == "failed"


def test_a_delivery_redis_cut_off_costs_the_chunk_no_attempt(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """Each Redis outage that hit a running chunk spent one of its attempts: after SAFETY_MAX_ATTEMPTS of them
    its items failed for good, the error blaming a worker death that never happened. The worker now uncounts
    the attempt once Redis answers (here at once: the blip is one write)."""
    client = job_client(redis_server.url, queue="blip-free-unconsumed", chunk_size=3)
    job = client.submit(make_items(3, prefix="f"), job_id="blip-free").status.job_id
    store = BlipOnce(client.store.client)
    task = SimpleNamespace(
        settings=WorkerSettings(max_attempts=1), store=store, metrics=Metrics(), classifier=tiny_classifier
    )
    with pytest.raises(Reject):
        deliver(task, job, 0)
    assert redis_server.client().hget(JobKeys(job).attempts, "0") == "0"
    assert deliver(task, job, 0)["action"] == "classified"  # the one attempt is still there
    assert [line["error"] for line in client.results(job, timeout=5)] == [None] * 3
    assert client.status(job).state == "done"


class CancelsMidChunk:
    """The real classifier; the job is cancelled (or deleted) by someone else while the chunk runs."""

    def __init__(self, clf: Any, during: Callable[[], Any]) -> None:
        self.clf, self.during, self.name = clf, during, clf.name

    def classify(self, items: Any) -> Any:
        results = self.clf.classify(items)
        self.during()
        return results


@pytest.mark.parametrize("what", ["cancelled", "gone"])
def test_a_chunk_whose_job_is_cancelled_or_gone_mid_flight_counts_as_skipped(
    what: str, redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """It was counted `done` though it wrote no result."""
    client = job_client(redis_server.url, queue="mid-flight-unconsumed", chunk_size=2)
    job = client.submit(make_items(4, prefix="f"), job_id=f"mid-flight-{what}").status.job_id
    if what == "cancelled":
        during: Callable[[], Any] = lambda: client.cancel(job)  # noqa: E731
    else:
        during = lambda: redis_server.client().delete(*JobKeys(job).all())  # noqa: E731
    metrics = Metrics()
    task = SimpleNamespace(
        settings=WorkerSettings(), store=client.store, metrics=metrics,
        classifier=CancelsMidChunk(tiny_classifier, during),
    )  # fmt: skip
    assert deliver(task, job, 0)["action"] == what

    def chunks(outcome: str) -> float:
        return metrics.registry.get_sample_value("safety_worker_chunks_total", {"outcome": outcome})

    assert (chunks("done"), chunks("skipped")) == (0, 1)
    assert metrics.registry.get_sample_value("safety_worker_items_total", {"outcome": "ok"}) == 0
    assert redis_server.client().hlen(JobKeys(job).results) == 0


def queued_args(server: RedisServer, queue: str) -> list[list[Any]]:
    """The args of every chunk message waiting in `queue`, oldest first (as a worker takes them)."""
    raws = server.client().lrange(queue, 0, -1)[::-1]  # kombu LPUSHes and BRPOPs
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0] for raw in raws]


def chunk_counts(metrics: Metrics) -> dict[str, float]:
    get = metrics.registry.get_sample_value
    return {
        **{
            o: get("safety_worker_chunks_total", {"outcome": o}) for o in ("done", "skipped", "dead_lettered")
        },
        **{f"items_{o}": get("safety_worker_items_total", {"outcome": o}) for o in ("ok", "failed")},
    }


@pytest.mark.parametrize("how", ["deleted", "expired"])
def test_a_stale_chunk_message_never_acts_on_a_new_job_of_the_same_id(
    how: str,
    redis_server: RedisServer,
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job's chunk message outlived the job: deleted (its tombstone expired while the message waited in a
    long backlog) or expired, and the id was submitted again. The message acted on the new job: delivered
    while the new job was still being submitted, it found the chunk's items missing with the job open, wrote
    failed lines ("its items are missing from Redis") for the new job's items and dead-lettered the chunk;
    the new job's own chunk then found them written (first write wins): its results were lost."""
    queue = f"stale-{how}-unconsumed"
    old_client = job_client(redis_server.url, queue=queue, chunk_size=2, result_ttl_s=1)
    new_client = job_client(redis_server.url, queue=queue, chunk_size=2, result_ttl_s=1000)
    r, keys = redis_server.client(), JobKeys("reused")
    old_client.submit(make_items(6, prefix="old"), job_id="reused")
    if how == "deleted":
        old_client.cancel("reused")
        old_client.delete("reused")
        poll(lambda: not r.exists(keys.deleted), 10, "the deleted job's tombstone to expire")
    else:
        poll(lambda: not r.exists(*keys.all()), 10, "the old job to expire")
    stale = [args for args in queued_args(redis_server, queue) if args[1] == 1]
    assert len(stale) == 1  # the old job's message for chunk 1, still queued

    metrics = Metrics()
    task = SimpleNamespace(
        settings=WorkerSettings(max_attempts=3),
        store=JobStore(redis_server.client()),
        metrics=metrics,
        classifier=tiny_classifier,
    )
    during: list[dict[str, Any]] = []
    upload = JobStore.upload

    def deliver_stale_before_chunk_1(self: JobStore, job: str, first: int, items: Any) -> bool:
        if first == 2:  # the new job is `submitting`, chunk 1's items not stored yet
            during.append(deliver(task, *stale[0]))
        return upload(self, job, first, items)

    monkeypatch.setattr(JobStore, "upload", deliver_stale_before_chunk_1)
    new_items = make_items(6, prefix="new")
    submitted = new_client.submit(new_items, job_id="reused")
    monkeypatch.undo()
    assert (submitted.resumed, submitted.sent) == (False, 3)
    assert during == [{"job_id": "reused", "chunk": 1, "action": "stale"}]
    # nothing counted, nothing written, nothing dead-lettered; the delivery is a skip
    assert r.hlen(keys.results) == 0 and r.hlen(keys.attempts) == 0 and r.hlen(keys.errors) == 0
    assert new_client.dead_letters() == [] and "error" not in r.hgetall(keys.job)
    assert chunk_counts(metrics) == dict.fromkeys(chunk_counts(metrics), 0) | {"skipped": 1}

    deliver_all(task, redis_server, queue, new_client, "reused", new_items, stale=3)  # the old job's three
    assert r.hgetall(keys.attempts) == {"0": "1", "1": "1", "2": "1"}


class Interrupted(Exception):
    pass


def start_and_interrupt(client: JobClient, job_id: str, items: list[dict[str, str]]) -> None:
    """A submit that created its job's record and stopped before it stored any item (still `submitting`)."""

    def interrupted(*args: Any) -> bool:
        raise Interrupted

    client.store.upload = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupted):
            client.submit(items, job_id=job_id)
    finally:
        del client.store.upload


class ReplacedBeforeItsItemsAreRead(JobStore):
    """The real store; `replace()` runs once, after the delivery started and before it reads its items."""

    replace: Callable[[], None] = staticmethod(lambda: None)

    def items(self, *args: Any) -> Any:
        replace, self.replace = self.replace, lambda: None
        replace()
        return super().items(*args)


def deliver_all(
    task: Any,
    server: RedisServer,
    queue: str,
    client: JobClient,
    job_id: str,
    items: list[dict[str, str]],
    *,
    stale: int,
) -> None:
    """Deliver every message queued (chunks of 2): the new job's own chunks classify, the `stale` messages of
    the old job of its id are skipped, and the new job ends done with its own items' results only."""
    outcomes = [deliver(task, *args)["action"] for args in queued_args(server, queue)]
    assert sorted(outcomes) == ["classified"] * math.ceil(len(items) / 2) + ["stale"] * stale
    status = client.status(job_id)
    assert (status.state, status.done, status.failed) == ("done", len(items), 0)
    lines = list(client.results(job_id, timeout=10))
    clf = task.classifier
    assert_job_output(lines, expected_lines(clf, items, 2), clf.thresholds)


class Generations:
    """Two jobs of one id: the old one submitted (4 items, chunks of 2; its chunk 0's message kept, as a
    queue left it), the new one's client and items ready. `delete_old()` cancels and deletes the old job and
    ends its id's reservation, as if its tombstone had expired."""

    def __init__(
        self, server: RedisServer, job_client: Callable[..., JobClient], job_id: str, queue: str
    ) -> None:
        self.job_id, self.redis, self.keys = job_id, server.client(), JobKeys(job_id)
        self.old_client = job_client(server.url, queue=queue, chunk_size=2, result_ttl_s=1000)
        self.new_client = job_client(server.url, queue=queue, chunk_size=2, result_ttl_s=1000)
        self.old_client.submit(make_items(4, prefix="old"), job_id=job_id)
        (self.old_message,) = [args for args in queued_args(server, queue) if args[1] == 0]
        self.new_items = make_items(4, prefix="new")

    def delete_old(self) -> None:
        self.old_client.cancel(self.job_id)
        self.old_client.delete(self.job_id)
        self.redis.delete(self.keys.deleted)  # its reservation ran out


class ReplacedThenFails:
    """The real classifier, except that the job is replaced (`during`) and then the classify raises."""

    def __init__(self, clf: Any, during: Callable[[], Any]) -> None:
        self.during, self.name = during, clf.name

    def classify(self, items: Any) -> Any:
        self.during()
        raise ValueError("the classify failed after the job was replaced")


class ReplacedThenBreaks(JobStore):
    """The real store, except that reading the items replaces the job and then raises a bug (not a Redis
    error): `deliver`'s own handler notes the error and hands the chunk back."""

    replace: Callable[[], None] = staticmethod(lambda: None)

    def items(self, *args: Any) -> Any:
        self.replace()
        raise KeyError("a bug while reading the items")


@pytest.mark.parametrize("where", ["classify-retried", "classify-last-attempt", "deliver-handler"])
def test_an_error_of_a_replaced_jobs_chunk_is_never_noted_on_the_new_job(
    where: str, redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """The job is replaced (cancelled, deleted, its id submitted again) while its chunk runs, and the delivery
    then fails: the error-noting paths (a classify error that is retried, one that gives up on the last
    attempt, and `deliver`'s handler for any other error) carry the message's nonce, so the new job gets no
    error, no dead-letter entry and no failed item from the old job's message."""
    g = Generations(redis_server, job_client, "swap-fails", f"replaced-fails-{where}-unconsumed")
    r, keys, old_message, new_client = g.redis, g.keys, g.old_message, g.new_client

    def replace() -> None:
        g.delete_old()
        new_client.submit(g.new_items, job_id="swap-fails")

    store: JobStore = JobStore(redis_server.client())
    classifier: Any = ReplacedThenFails(tiny_classifier, replace)
    if where == "deliver-handler":
        store = ReplacedThenBreaks(redis_server.client())
        store.replace = replace  # type: ignore[attr-defined]
    settings = WorkerSettings(max_attempts=1 if where == "classify-last-attempt" else 3)
    task = SimpleNamespace(settings=settings, store=store, metrics=Metrics(), classifier=classifier)
    if where == "classify-last-attempt":
        assert deliver(task, *old_message)["action"] == "stale"  # give_up's write found another job
    else:
        with pytest.raises(Reject):
            deliver(task, *old_message)
    assert r.hget(keys.job, "nonce") != old_message[2]  # the new job
    assert r.hlen(keys.errors) == 0 and "error" not in r.hgetall(keys.job)
    assert r.hlen(keys.results) == 0 and new_client.dead_letters() == []


@pytest.mark.parametrize("when", ["before-items", "mid-classify"])
def test_a_job_replaced_while_its_chunk_runs_gets_nothing_from_that_chunk(
    when: str, redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_classifier: Any
) -> None:
    """The job was cancelled, deleted and its id submitted again (its reservation over) while one of its
    chunks ran: the delivery wrote the old job's results into the new job ('mid-classify'), or, finding the
    new job's items not stored yet, failed them and dead-lettered the chunk ('before-items')."""
    queue = f"replaced-{when}-unconsumed"
    g = Generations(redis_server, job_client, "swap", queue)
    r, keys, old_message, new_client, new_items = g.redis, g.keys, g.old_message, g.new_client, g.new_items

    def replace() -> None:
        g.delete_old()
        start_and_interrupt(new_client, "swap", new_items)

    store = ReplacedBeforeItsItemsAreRead(redis_server.client())
    classifier: Any = tiny_classifier
    if when == "before-items":
        store.replace = replace
    else:
        classifier = CancelsMidChunk(tiny_classifier, replace)
    metrics = Metrics()
    task = SimpleNamespace(settings=WorkerSettings(), store=store, metrics=metrics, classifier=classifier)
    assert deliver(task, *old_message) == {"job_id": "swap", "chunk": 0, "action": "stale"}
    assert r.hget(keys.job, "state") == "submitting" and r.hlen(keys.results) == 0
    assert r.hlen(keys.attempts) == 0 and r.hlen(keys.errors) == 0 and new_client.dead_letters() == []
    assert chunk_counts(metrics) == dict.fromkeys(chunk_counts(metrics), 0) | {"skipped": 1}

    resumed = new_client.submit(new_items, job_id="swap")  # the new job's submit goes on
    assert (resumed.resumed, resumed.sent) == (True, 2)
    task = SimpleNamespace(
        settings=WorkerSettings(), store=store, metrics=metrics, classifier=tiny_classifier
    )
    deliver_all(task, redis_server, queue, new_client, "swap", new_items, stale=2)  # the old job's two


def test_every_time_on_a_job_is_in_redis_clock_whatever_the_hosts_say(
    redis_server: RedisServer,
    job_client: Callable[..., JobClient],
    tiny_classifier: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A submitter and workers whose clocks are a day off (time.time() here) still stamp every time on a
    record in Redis's: the lost-chunk sweeper compares them with Redis's now, and a job's created, started
    and finished times are in order. (A worker a day ahead made a stalled job look busy for a day.)"""
    client = job_client(redis_server.url, queue="clock-unconsumed", chunk_size=2)
    skew = 86_400.0
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + skew)  # this host: a day ahead
    job = client.submit(make_items(4, prefix="t"), job_id="clock").status.job_id
    task = SimpleNamespace(
        settings=WorkerSettings(max_attempts=1),
        store=client.store,
        metrics=Metrics(),
        classifier=tiny_classifier,
    )
    assert deliver(task, job, 0)["action"] == "classified"
    assert (
        deliver(SimpleNamespace(**{**vars(task), "classifier": Broken()}), job, 1)["action"]
        == "dead-lettered"
    )
    client.submit(make_items(2, prefix="c"), job_id="clock-cancelled")
    client.cancel("clock-cancelled")
    monkeypatch.setattr(time, "time", real)

    now = client.store.server_time()
    record, cancelled = client.store.get(job), client.store.get("clock-cancelled")
    assert record is not None and cancelled is not None
    stamps = {k: float(record[k]) for k in ("created", "sent_at", "started", "updated", "finished")}
    stamps |= {f"cancelled {k}": float(cancelled[k]) for k in ("created", "updated", "finished")}
    stamps["dead letter"] = client.store.dead_letters()[0]["at"]
    assert all(now - 60 < t <= now for t in stamps.values()), (now, stamps)
    status = client.status(job)
    assert status.created_at <= status.started_at <= status.finished_at  # type: ignore[operator]
