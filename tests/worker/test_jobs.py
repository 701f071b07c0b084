"""The job client and the job store against a real, fresh Redis; no worker: tests write chunk results."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from model.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    JobBusyError,
    NotFoundError,
    UnavailableError,
)
from tests.worker.harness import (
    RedisServer,
    Spools,
    free_port,
    long_items,
    make_items,
    poll,
    retry_figure,
    traced_peak,
)
from worker.app import TASK_NAME
from worker.items import normalize_item
from worker.jobs import CANCELLED, NOT_SUBMITTED, JobClient
from worker.settings import WorkerSettings
from worker.store import (
    ACTIVE_JOBS,
    DEAD_LETTER,
    SUBMIT_STALL_S,
    JobKeys,
    failed_line,
    line_runs,
    result_line,
)

Client = Callable[..., JobClient]


def fake_result(index: int, item_id: str | None = None) -> str:
    """A result line as a worker would write it (content is irrelevant to the store)."""
    return json.dumps(result_line(index, {"id": item_id, "scores": {"x": index / 100}}))


def queued_messages(server: RedisServer, queue: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in server.client().lrange(queue, 0, -1)]


def test_invalid_items_are_refused_before_anything_is_queued(
    redis_server: RedisServer, job_client: Client
) -> None:
    client = job_client(redis_server.url, queue="q")
    items = [*make_items(7), {"text": "fine", "role": "moderator"}, *make_items(3)]
    with pytest.raises(InvalidInputError) as e:
        client.submit(items, job_id="bad-job")
    assert (e.value.index, e.value.field) == (7, "role")
    assert redis_server.client().dbsize() == 0  # no job record, no items, no message


@pytest.mark.parametrize("job_id", ["", "-leading-dash", "has space", "x" * 129, "a/b", "{tag}"])
def test_job_ids_are_checked(job_id: str, redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url)
    with pytest.raises(InvalidInputError) as e:
        client.submit(make_items(1), job_id=job_id)
    assert e.value.field == "job_id"
    with pytest.raises(InvalidInputError):
        client.status(job_id)


def test_submit_queues_one_json_task_per_chunk(redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=10)

    def subscribes() -> int:
        return redis_server.client().info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0)

    before = subscribes()
    submitted = client.submit(make_items(25), job_id="j1")
    assert subscribes() == before  # results live in the job store: no result channel per chunk
    st = submitted.status
    assert (st.state, st.total, st.done, st.failed, st.chunks, submitted.sent) == ("queued", 25, 0, 0, 3, 3)
    messages = queued_messages(redis_server, "q")
    assert all(m["content-type"] == "application/json" for m in messages)
    assert sorted(m["headers"]["id"] for m in messages) == ["j1.0", "j1.1", "j1.2"]
    assert {m["headers"]["task"] for m in messages} == {TASK_NAME}
    stored = client.store.items("j1", range(25))
    assert stored[3] == {"role": "prompt", **make_items(25)[3]}


def test_resubmitting_resumes_and_never_queues_a_chunk_twice(
    redis_server: RedisServer, job_client: Client
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=10)
    items = make_items(25)
    client.submit(items, job_id="j2")
    again = client.submit(items, job_id="j2")
    assert again.resumed and again.sent == 0
    assert len(queued_messages(redis_server, "q")) == 3
    # An interrupted submission: chunk 2 was never sent.
    r = redis_server.client()
    r.srem(JobKeys("j2").enqueued, 2)
    (lost,) = [m for m in r.lrange("q", 0, -1) if json.loads(m)["headers"]["id"] == "j2.2"]
    r.lrem("q", 1, lost)
    resumed = client.submit(items, job_id="j2")
    assert resumed.resumed and resumed.sent == 1
    assert sorted(m["headers"]["id"] for m in queued_messages(redis_server, "q")) == ["j2.0", "j2.1", "j2.2"]
    assert r.lrange(ACTIVE_JOBS, 0, -1).count("j2") == 1  # open once, however often it was submitted
    with pytest.raises(InvalidInputError, match="already exists with different items") as e:
        client.submit(make_items(25, prefix="other"), job_id="j2")
    assert e.value.field == "job_id"


def test_the_same_items_resume_from_any_front_end_whatever_form_a_missing_id_takes(
    redis_server: RedisServer, job_client: Client
) -> None:
    """The CLI stores an item without an id as such, SubmitJob sends its empty id, a JSON item may say
    `"id": ""` or null: the same job, so a resubmit from another front end resumes (it was refused as
    "already exists with different items")."""
    from service.jobs import job_items_from_proto
    from service.stubs import pb2

    client = job_client(redis_server.url, queue="q", chunk_size=2)
    texts = ["one", "two", "three"]
    first = client.submit([{"text": t} for t in texts], job_id="ids")
    assert not first.resumed
    grpc_items = job_items_from_proto(pb2.SubmitJobRequest(items=[pb2.Item(text=t) for t in texts]))
    forms = [
        grpc_items,
        [{"text": t, "id": ""} for t in texts],
        [{"text": t, "id": None} for t in texts],
        [{"text": t, "id": str(i)} for i, t in enumerate(texts)],
    ]
    for items in forms:
        again = client.submit(items, job_id="ids")
        assert again.resumed and again.sent == 0, items
    assert [item["id"] for item in client.store.items("ids", range(3))] == ["0", "1", "2"]


def test_a_job_started_by_the_previous_release_without_item_ids_resumes(
    redis_server: RedisServer, job_client: Client
) -> None:
    """The previous release's CLI/JobClient stored an item without an id without one, so its digest differs
    from this release's (which stores the index as the id): its interrupted job was refused on resume as
    "already exists with different items"."""
    import hashlib

    client = job_client(redis_server.url, queue="q", chunk_size=2)
    texts = ["one", "two", "three", "four", "five"]
    items = [{"text": t} for t in texts[:4]] + [{"text": texts[4], "id": "own"}]
    client.submit(items, job_id="old")
    # what the previous release stored: no id where none was given, and the digest of those lines
    old_lines = [json.dumps({"role": "prompt", "text": t}, sort_keys=True) for t in texts[:4]]
    old_lines.append(json.dumps({"id": "own", "role": "prompt", "text": texts[4]}, sort_keys=True))
    r, keys = redis_server.client(), JobKeys("old")
    r.hset(keys.items, mapping={str(i): line for i, line in enumerate(old_lines[:4])})
    r.hset(
        keys.job,
        mapping={"state": "submitting", "digest": hashlib.sha256("\n".join(old_lines).encode()).hexdigest()},
    )
    r.srem(keys.enqueued, 2)  # interrupted before its last chunk

    resumed = client.submit(items, job_id="old")
    assert (resumed.resumed, resumed.sent, resumed.status.state) == (True, 1, "queued")
    # the items it stored keep no id; every result line still names them by the product rule
    assert [it.get("id") for it in client.store.items("old", range(5))] == [None, None, None, None, "own"]
    with pytest.raises(InvalidInputError, match="already exists with different items"):
        client.submit([{"text": t} for t in texts], job_id="old")  # the last item's id differs: other items


def test_a_large_job_is_checked_and_sent_in_a_chunks_memory(
    redis_server: RedisServer, job_client: Client
) -> None:
    """`prepare` held every normalized item and every canonical line in lists (0.5 to 0.8 GB RSS for a
    500k-item `safety submit`): the client's memory grew with the job, not with a chunk."""
    client = job_client(redis_server.url, queue="q", chunk_size=500)
    client.submit(make_items(1), job_id="warm-up")  # Celery's app, the producer pool, the Lua scripts: once
    n = 40_000  # ~240 bytes of canonical JSON each: 9.6 MB of lines
    submitted, peak = traced_peak(lambda: client.submit(long_items(n), job_id="large"))
    assert (submitted.status.total, submitted.status.chunks, submitted.sent) == (n, 80, 80)
    assert redis_server.client().hlen(JobKeys("large").items) == n
    last = next(itertools.islice(long_items(n), n - 1, None))
    assert client.store.items("large", [n - 1]) == [{"role": "prompt", **last}]
    # The old lists: 40k lines (~10 MB with their str headers) and 40k normalized dicts with their strs: a
    # 32 MB peak here. Streaming holds one chunk of 500 lines (~150 KB), its HSET arguments and the encoded
    # command, a few times that (0.5 MB measured), whatever `n` is: 4 MB leaves room for both sides.
    assert peak < 4_000_000, f"peak {peak / 1e6:.1f} MB"


def test_a_spooled_job_has_every_releases_digest_and_resumes_from_any_path(
    redis_server: RedisServer, job_client: Client, spools: Spools
) -> None:
    """The digest of a job whose items stream through a spool file must be the one the list-based submit
    gave (sha256 of the canonical lines joined by newlines), so a resume works across paths and releases."""
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    items = [
        {"text": "plain"},
        {"id": "own", "text": "caf\u00e9 \u2028 line separator, \u4e2d\u6587, \U0001f600"},
        {"text": "answer", "role": "response", "context": "question?"},
        {"id": "", "text": "empty id"},
        {"id": "4", "text": "the index as id", "role": None},
    ]
    # the old algorithm, as the previous releases computed it
    old = [json.dumps(normalize_item(it, i, max_text_chars=1000), ensure_ascii=False, sort_keys=True)
           for i, it in enumerate(items)]  # fmt: skip
    old_digest = hashlib.sha256("\n".join(old).encode()).hexdigest()
    with client.prepare(iter(items)) as spooled, client.prepare(items) as listed:
        assert spooled.spooled and not listed.spooled
        assert spooled.digest == listed.digest == old_digest
        assert spooled.count == listed.count == len(items)
        assert list(spooled.lines()) == list(spooled.lines()) == old  # read back as often as needed
        runs = [old[0:2], old[2:4], old[4:]]
        assert list(spooled.payloads(2)) == ["".join(x + "\n" for x in run).encode() for run in runs]

    # started by the list path, interrupted before its last chunk, resumed from a stream
    client.submit(items, job_id="paths")
    r, keys = redis_server.client(), JobKeys("paths")
    r.srem(keys.enqueued, 2)
    r.hdel(keys.items, "4")
    resumed = client.submit(iter(items), job_id="paths")
    assert (resumed.resumed, resumed.sent) == (True, 1)
    assert r.hget(keys.items, "4") == old[4]
    # and the other way round: started from a stream, resumed from a list
    client.submit(iter(items), job_id="streamed")
    assert client.submit(items, job_id="streamed").resumed
    # a job the release before last started (no id where the item had none): resumed from a stream
    legacy = [json.dumps({k: v for k, v in json.loads(line).items() if (k, v) != ("id", str(i))},
                         ensure_ascii=False, sort_keys=True) for i, line in enumerate(old)]  # fmt: skip
    r.hset(JobKeys("streamed").job, "digest", hashlib.sha256("\n".join(legacy).encode()).hexdigest())
    assert client.submit(iter(items), job_id="streamed").resumed
    with pytest.raises(InvalidInputError, match="already exists with different items"):
        client.submit(iter([*items[:4], {"text": "other"}]), job_id="streamed")
    assert spools.all_closed()


def awkward_items(n: int) -> list[dict[str, str]]:
    """`n` items whose JSON escapes all it can: quotes, backslashes, control characters (a raw newline among
    them), separators a JSON line may hold raw (U+2028, U+0085), accents, CJK, an emoji, a BOM; sizes that
    vary, ids given or not, responses with context."""
    odd = (
        'a "quoted" \\ back\\slash\nnew\tline\x00\x1f\x7f \u2028\u0085 caf\u00e9 \u4e2d \U0001f600 \ufeff </'
    )
    items = []
    for i in range(n):
        item = {"text": f"{i} " + odd[: 5 + i % len(odd)] + "x" * (i % 97)}
        if i % 3:
            item["id"] = f"own {odd[i % 11 : i % 11 + 4]} {i}"
        if i % 4 == 1:
            item |= {"role": "response", "context": odd[::-1][: 3 + i % 40]}
        items.append(item)
    return items


def test_a_spooled_job_written_in_many_batches_has_the_old_digest_lines_and_stored_items(
    redis_server: RedisServer, job_client: Client, spools: Spools
) -> None:
    """The spool is written, and the digest fed, many lines at a time, and each chunk is sent as one string of
    lines: the digest, the lines read back and the items stored must be what the previous releases made
    (json.dumps of each normalized item, the digest of them all joined by newlines, one hash field per item),
    across every boundary of a write batch (64K characters) and of a chunk (7 items, never aligned)."""
    client = job_client(redis_server.url, queue="q", chunk_size=7)
    items = awkward_items(3000)  # ~350K characters of lines: 5 write batches, 429 chunks
    old = [json.dumps(normalize_item(it, i, max_text_chars=1000), ensure_ascii=False, sort_keys=True)
           for i, it in enumerate(items)]  # fmt: skip
    assert sum(map(len, old)) > 5 * 65536 and all("\n" not in line for line in old)
    old_digest = hashlib.sha256("\n".join(old).encode()).hexdigest()
    with client.prepare(iter(items)) as spooled, client.prepare(items) as listed:
        assert (spooled.digest, spooled.count) == (listed.digest, listed.count) == (old_digest, 3000)
        assert list(spooled.lines()) == list(listed.lines()) == old
        want = ["".join(line + "\n" for line in old[i : i + 7]).encode() for i in range(0, 3000, 7)]
        assert list(spooled.payloads(7)) == list(listed.payloads(7)) == want
    r = redis_server.client()
    for job_id, source in (("streamed", iter(items)), ("listed", items)):
        assert client.submit(source, job_id=job_id).status.chunks == 429
        assert r.hgetall(JobKeys(job_id).items) == {str(i): line for i, line in enumerate(old)}
        assert r.hget(JobKeys(job_id).job, "digest") == old_digest
    assert spools.all_closed()


@pytest.mark.parametrize("size", [1, 499, 500, 501, 4500])
def test_a_chunk_sent_as_one_string_of_lines_stores_one_field_per_item(
    size: int, redis_server: RedisServer, job_client: Client
) -> None:
    """`upload` given the lines in one bytes object (Lua splits them; HSET 500 items at a time) stores each
    line as its item's field. 4,500 items in one chunk: one HSET of every pair, which `upload` sent, was over
    Lua's unpack limit ("too many results to unpack": SAFETY_CHUNK_SIZE of 4,000 or more could not be
    submitted)."""
    client = job_client(redis_server.url, queue="q", chunk_size=size)
    lines = [json.dumps(it, ensure_ascii=False) for it in awkward_items(size)]
    r = redis_server.client()
    r.hset(JobKeys("lines").job, mapping={"state": "submitting"})
    r.expire(JobKeys("lines").job, 100)
    assert client.store.upload("lines", 3, "".join(line + "\n" for line in lines).encode())
    assert r.hgetall(JobKeys("lines").items) == {str(3 + i): line for i, line in enumerate(lines)}
    assert abs(r.pttl(JobKeys("lines").items) - r.pttl(JobKeys("lines").job)) < 1000  # with the record
    submitted = client.submit(awkward_items(size), job_id="one-chunk")
    assert (submitted.status.chunks, submitted.sent, r.hlen(JobKeys("one-chunk").items)) == (1, 1, size)


def test_line_runs_cut_after_line_ends_within_the_limit() -> None:
    lines = b"aaa\nbb\ncccccccc\nd\n"
    assert [bytes(r) for r in line_runs(lines, 100)] == [lines]
    assert [bytes(r) for r in line_runs(lines, 7)] == [b"aaa\nbb\n", b"cccccccc\n", b"d\n"]  # 9 > 7: alone
    assert [bytes(r) for r in line_runs(lines, 4)] == [b"aaa\n", b"bb\n", b"cccccccc\n", b"d\n"]
    assert b"".join(line_runs(lines, 1)) == lines and line_runs(b"", 4) == []


def test_a_chunk_longer_than_one_redis_argument_is_stored_whole(
    redis_server: RedisServer, job_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refuses an argument over proto-max-bulk-len (512 MB by default; 1 MB here) and drops the
    connection: a chunk of long items, sent as one string, failed as "Redis ... is unreachable" on every
    try (256 items of 200,000 control characters is 614 MB). It goes as several runs of whole lines."""
    redis_server.client().config_set("proto-max-bulk-len", "1mb")
    monkeypatch.setattr("worker.store.MAX_ARG_BYTES", 300_000)
    client = job_client(redis_server.url, queue="q", chunk_size=8, max_text_chars=300_000)
    items = [{"id": str(i), "text": chr(0x41 + i) * 250_000} for i in range(8)]  # 2 MB of lines in one chunk
    submitted = client.submit(items, job_id="long-lines")
    assert (submitted.status.chunks, submitted.sent, submitted.status.state) == (1, 1, "queued")
    stored = redis_server.client().hgetall(JobKeys("long-lines").items)
    lines = [json.dumps(normalize_item(it, i, max_text_chars=300_000), sort_keys=True)
             for i, it in enumerate(items)]  # fmt: skip
    assert stored == {str(i): line for i, line in enumerate(lines)}


def test_waiting_on_a_job_whose_submission_stopped_says_how_to_resume_it(
    redis_server: RedisServer, job_client: Client
) -> None:
    """An interrupted submit leaves the job `submitting`; `wait` and `results` without a timeout waited for
    the whole TTL. Chunks 0 and 1 were queued (and classified here), chunk 2 never was."""
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    items = make_items(6)
    client.submit(items, job_id="half")
    r, keys = redis_server.client(), JobKeys("half")
    assert float(r.hget(keys.job, "sent_at")) >= float(r.hget(keys.job, "created"))  # progress noted
    r.hset(keys.job, "state", "submitting")
    r.srem(keys.enqueued, 2)
    client.store.write("half", [(i, fake_result(i), False) for i in range(4)])
    with pytest.raises(DeadlineExceededError):  # its submitter may still be at work: wait as asked
        client.wait("half", timeout=0.3, poll_s=0.05)
    r.hset(keys.job, "sent_at", repr(time.time() - SUBMIT_STALL_S - 1))  # ... but it stored nothing since
    message = r"job 'half' is not fully submitted: its submission stopped at 4 of 6 items \(2 of 3 chunks"
    with pytest.raises(FailedPreconditionError, match=message) as e:
        client.wait("half", timeout=5, poll_s=0.05)
    assert "safety submit FILE --job-id half" in str(e.value)
    stream = client.results("half", timeout=5, poll_s=0.05)
    assert [line["index"] for line in itertools.islice(stream, 4)] == [0, 1, 2, 3]
    with pytest.raises(FailedPreconditionError, match=message):
        next(stream)
    resumed = client.submit(items, job_id="half")
    assert (resumed.resumed, resumed.sent, resumed.status.state) == (True, 1, "queued")


def test_submit_progress_is_stamped_and_read_in_redis_clock_not_the_hosts(
    redis_server: RedisServer, job_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sent_at` was the submitter's time.time() and the readers compared it with their own: a submitter whose
    clock is 5 minutes behind made its live job look stopped at once (wait/results refused it, the sweeper
    dropped it from the open list); one ahead hid a stopped submit for as long."""
    from worker.app import chunk_task_id
    from worker.reclaim import Sweeper

    client = job_client(redis_server.url, queue="q", chunk_size=2)
    r, keys = redis_server.client(), JobKeys("skew")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 300)  # the submitter's host
    client.submit(make_items(6), job_id="skew")
    monkeypatch.setattr(time, "time", real_time)
    seconds, micros = r.time()
    assert abs(float(r.hget(keys.job, "sent_at")) - (seconds + micros / 1e6)) < 5
    r.hset(keys.job, "state", "submitting")  # its submitter is still at work, storing the last chunk
    with pytest.raises(DeadlineExceededError):  # not FailedPreconditionError: it is not stalled
        client.wait("skew", timeout=0.2, poll_s=0.05)
    sweeper = Sweeper(client.store, lambda *a: None, chunk_task_id, stall_s=60.0, interval_s=30.0)
    assert sweeper.run_once() == [] and client.store.active() == ["skew"]  # still watched

    monkeypatch.setattr(time, "time", lambda: real_time() + 300)  # now the reader's host is ahead
    with pytest.raises(DeadlineExceededError):
        client.wait("skew", timeout=0.2, poll_s=0.05)
    assert sweeper.run_once() == [] and client.store.active() == ["skew"]


def queued_ids(server: RedisServer, queue: str) -> list[str]:
    return sorted(m["headers"]["id"] for m in queued_messages(server, queue))


def blocked_at_chunk(client: JobClient, chunk: int) -> tuple[threading.Event, threading.Event]:
    """`client`'s submit stops before it stores `chunk`, until the second event is set; the first is set when
    it got there. On this client's store only (another client in the test is another process)."""
    reached, go = threading.Event(), threading.Event()
    upload, size = client.store.upload, client.settings.chunk_size

    def upload_when_told(job: str, first: int, lines: bytes) -> bool:
        if first == chunk * size:
            reached.set()
            assert go.wait(30), "the test never let the submit go on"
        return upload(job, first, lines)

    client.store.upload = upload_when_told  # type: ignore[method-assign]
    return reached, go


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `fn` in a thread; the list gets what it returned or raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the test
            out.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_two_submits_of_one_job_at_once_queue_each_chunk_once(
    redis_server: RedisServer, job_client: Client
) -> None:
    """Both read the chunks already sent once, before sending any: each queued every chunk the other had
    not yet marked (782 chunks -> 1,564 messages), and workers classified them twice."""
    first = job_client(redis_server.url, queue="q", chunk_size=2)
    second = job_client(redis_server.url, queue="q", chunk_size=2)
    said: list[str] = []
    second.notice = said.append
    items = make_items(20)
    reached, go = blocked_at_chunk(first, 1)  # chunk 0 sent and marked, chunk 1 about to be stored
    one, got_one = in_thread(lambda: first.submit(items, job_id="twice"))
    assert reached.wait(10)
    two, got_two = in_thread(lambda: second.submit(items, job_id="twice"))
    poll(lambda: said or not two.is_alive(), 10, "the second submit to wait for the first (or to finish)")
    go.set()
    one.join(30)
    two.join(30)
    assert not one.is_alive() and not two.is_alive()
    assert (got_one[0].resumed, got_one[0].sent) == (False, 10), got_one
    assert (got_two[0].resumed, got_two[0].sent, got_two[0].status.state) == (True, 0, "queued"), got_two
    assert queued_ids(redis_server, "q") == sorted(f"twice.{c}" for c in range(10))  # each chunk once
    assert "job twice is being submitted by another process; waiting up to" in said[0]
    assert not redis_server.client().exists(JobKeys("twice").submitter)  # released at the end


def test_a_submit_that_paused_past_its_lease_reads_again_what_another_sent(
    redis_server: RedisServer, job_client: Client
) -> None:
    """A submit stopped past its lease (Ctrl-Z, a sleeping laptop) while another finished the job sends
    nothing the other sent when it goes on."""
    paused = job_client(redis_server.url, queue="q", chunk_size=2)
    paused.submit_lease_s = 0.3
    items = make_items(20)
    reached, go = blocked_at_chunk(paused, 3)
    one, got_one = in_thread(lambda: paused.submit(items, job_id="paused"))
    assert reached.wait(10)
    lease = JobKeys("paused").submitter
    poll(lambda: not redis_server.client().exists(lease), 10, "the paused submit's lease to expire")
    other = job_client(redis_server.url, queue="q", chunk_size=2).submit(items, job_id="paused")
    assert (other.resumed, other.sent) == (True, 7)  # chunks 3 to 9
    go.set()
    one.join(30)
    assert (got_one[0].sent, got_one[0].status.state) == (3, "queued"), got_one  # chunks 0 to 2 only
    assert queued_ids(redis_server, "q") == sorted(f"paused.{c}" for c in range(10))


def test_a_submit_that_died_holding_the_lease_holds_up_a_resume_until_the_lease_expires(
    redis_server: RedisServer, job_client: Client
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    client.submit_lease_s = 0.5
    said: list[str] = []
    client.notice = said.append
    items, r, keys = make_items(10), redis_server.client(), JobKeys("died")
    client.submit(items, job_id="died")
    for chunk in (3, 4):  # the submit that died had sent chunks 0 to 2, and held the lease
        r.srem(keys.enqueued, chunk)
        r.lrem(
            "q", 1, next(m for m in r.lrange("q", 0, -1) if json.loads(m)["headers"]["id"] == f"died.{chunk}")
        )
    r.hset(keys.job, "state", "submitting")
    r.set(keys.submitter, "the-dead-submits-token", px=500)
    began = time.monotonic()
    resumed = client.submit(items, job_id="died")
    assert time.monotonic() - began >= 0.3 and said, said  # it waited for the lease to expire
    assert (resumed.resumed, resumed.sent, resumed.status.state) == (True, 2, "queued")
    assert queued_ids(redis_server, "q") == sorted(f"died.{c}" for c in range(5))


def test_a_submit_refuses_a_job_another_live_submit_holds_saying_what_to_do(
    redis_server: RedisServer, job_client: Client
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    client.submit_lease_s = 0.4
    client.notice = lambda message: None
    items, r, keys = make_items(6), redis_server.client(), JobKeys("held")
    client.submit(items, job_id="held")
    r.srem(keys.enqueued, 2)
    r.hset(keys.job, "state", "submitting")
    stop = threading.Event()

    def live_submitter() -> None:  # another process, renewing its lease as it stores chunks
        while not stop.is_set():
            client.store.hold_submit("held", "other-process", 0.4)
            stop.wait(0.05)

    thread = threading.Thread(target=live_submitter)
    thread.start()
    try:
        with pytest.raises(JobBusyError) as e:
            client.submit(items, job_id="held")
        said: list[str] = []
        client.notice = said.append
        with pytest.raises(JobBusyError) as at_once:  # the gRPC SubmitJob's way: no wait on a server thread
            client.submit(items, job_id="held", lease_wait_s=0)
    finally:
        stop.set()
        thread.join()
    assert not said and "(this call does not wait)" in str(at_once.value), (said, at_once.value)
    assert 0 < at_once.value.retry_after_ms <= 400  # the other lease's remaining time: the retry hint
    assert isinstance(e.value, UnavailableError)  # gRPC UNAVAILABLE: retry (reason JOB_BUSY)
    message = str(e.value)
    assert "job 'held' is being submitted by another process" in message, message
    assert "safety job status held" in message and re.search(r"retry after \d+s", message), message
    assert r.get(keys.submitter) == "other-process"  # not taken, not released
    assert len(queued_messages(redis_server, "q")) == 3  # nothing sent


def test_the_submit_lease_is_renewed_by_its_holder_and_freed_only_by_it(
    redis_server: RedisServer, job_client: Client
) -> None:
    store, r, lease = job_client(redis_server.url).store, redis_server.client(), JobKeys("lease").submitter
    assert store.hold_submit("lease", "a", 5) == ("taken", 0)
    assert r.get(lease) == "a" and 4_000 < r.pttl(lease) <= 5_000
    state, left = store.hold_submit("lease", "b", 5)
    assert state == "busy" and 4 < left <= 5 and r.get(lease) == "a"
    r.pexpire(lease, 1_000)
    assert store.hold_submit("lease", "a", 5) == ("renewed", 0) and r.pttl(lease) > 4_000
    assert not store.release_submit("lease", "b") and r.get(lease) == "a"
    assert store.release_submit("lease", "a") and not r.exists(lease)
    assert store.hold_submit("lease", "b", 5) == ("taken", 0)


def cancel_at_chunk(client: JobClient, job_id: str, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """CancelJob arrives (from another client) while the submit is about to store `chunk`."""
    upload = type(client.store).upload
    size = client.settings.chunk_size

    def upload_then_cancel(store: Any, job: str, first: int, items: Any) -> bool:
        if first == chunk * size:
            store.cancel(job_id)
        return upload(store, job, first, items)

    monkeypatch.setattr(type(client.store), "upload", upload_then_cancel)


def test_a_cancel_during_the_submit_stops_it(
    redis_server: RedisServer, job_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submitter uploaded and queued every chunk of a cancelled job anyway, and reported success."""
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    cancel_at_chunk(client, "cut", 2, monkeypatch)
    submitted = client.submit(make_items(10), job_id="cut")
    assert (submitted.status.state, submitted.sent) == ("cancelled", 2)
    r, keys = redis_server.client(), JobKeys("cut")
    assert r.hlen(keys.items) == 4 and client.store.enqueued("cut") == {0, 1}
    assert len(queued_messages(redis_server, "q")) == 2
    again = client.submit(make_items(10), job_id="cut")  # a resume finds it finished: nothing more is sent
    assert (again.resumed, again.sent, again.status.state) == (True, 0, "cancelled")
    # every item has a 'cancelled' line: those stored with their id; those never stored have none (their id
    # never reached Redis: the index in its place passed for another item's id, "74240" for "m74240")
    lines = list(client.results("cut", timeout=10))
    assert [line["index"] for line in lines] == list(range(10))
    assert [line["id"] for line in lines] == [f"item-{i}" for i in range(4)] + [None] * 6
    assert [line["error"] for line in lines] == [CANCELLED] * 4 + [NOT_SUBMITTED] * 6
    assert NOT_SUBMITTED.startswith("cancelled") and all(line["scores"] is None for line in lines)


@pytest.mark.parametrize("what", ["deleted", "flushed", "replaced"])
def test_a_cancelled_job_gone_while_its_results_stream_ends_it_rather_than_making_up_lines(
    what: str, redis_server: RedisServer, job_client: Client
) -> None:
    """Items missing from Redis were taken for items the cancel stopped before they were stored, without a
    look at the job: a cancelled job deleted (or a Redis flushed, or the job expired and its id reused) while
    its results streamed gave made-up `"id": null` "cancelled before it was submitted" lines for items it had
    stored, and then ended as if complete."""
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    submitted = client.submit(make_items(10), job_id="vanish")
    client.store.write("vanish", [(i, fake_result(i, f"item-{i}"), False) for i in range(2)])  # chunk 0
    client.cancel("vanish")
    lines = client.results("vanish", timeout=10)
    first = next(lines)  # the results were read; the gap (items 2 to 9) is not yet
    r, keys = redis_server.client(), JobKeys("vanish")
    if what == "deleted":
        client.delete("vanish")
    elif what == "flushed":
        r.flushall()
    else:  # it expired, and a new job of that id was submitted and cancelled
        r.delete(*keys.all())
        client.submit(make_items(10, prefix="new"), job_id="vanish")
        client.cancel("vanish")
    got = [first]
    with pytest.raises(NotFoundError) as e:
        got.extend(lines)
    assert [line["id"] for line in got] == ["item-0", "item-1"]  # what was read before it went: nothing more
    expected = {
        "deleted": "job 'vanish' not found: it was deleted",
        "flushed": "job 'vanish' disappeared while cancelled (2/10 items): Redis lost its data",
        "replaced": "job 'vanish' disappeared while cancelled (2/10 items): it expired and a new job was "
        "submitted with its id",
    }[what]
    assert str(e.value).startswith(expected), str(e.value)
    if what == "replaced":  # a wait that knew the job follows no other job of its id either
        with pytest.raises(NotFoundError, match="a new job was submitted with its id"):
            client.wait("vanish", known=submitted.status)


def test_delete_removes_every_key_of_a_finished_or_cancelled_job_only(
    redis_server: RedisServer, job_client: Client
) -> None:
    """A cancelled job kept all its item texts for the TTL; there was no way to free a job's results after
    downloading them, or to reuse its id."""
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    r = redis_server.client()
    client.submit(make_items(4), job_id="open")
    with pytest.raises(FailedPreconditionError, match=r"'open' is queued: .* cancel it first"):
        client.delete("open")
    assert r.hlen(JobKeys("open").items) == 4  # nothing deleted
    client.cancel("open")
    assert client.delete("open").state == "cancelled"
    # only the tombstone is left, which reserves the id
    assert r.keys("safety:job:{open}*") == [JobKeys("open").deleted]
    assert "open" not in r.lrange(ACTIVE_JOBS, 0, -1)
    with pytest.raises(NotFoundError, match="'open' not found: it was deleted"):
        client.delete("open")

    client.submit(make_items(2), job_id="done")
    client.store.write("done", [(i, fake_result(i), False) for i in range(2)])
    assert (client.delete("done").state, r.keys("safety:job:{done}*")) == ("done", [JobKeys("done").deleted])
    with pytest.raises(InvalidInputError):
        client.delete("{bad}")


def test_a_deleted_jobs_id_stays_reserved_so_its_leftover_work_never_hits_a_new_job(
    redis_server: RedisServer, job_client: Client
) -> None:
    """Delete freed the id at once: the deleted job's chunk messages, still queued after its cancel, then ran
    against a new job of the same id (its items failed as "missing from Redis", dead letters, the new job
    classified on the old texts)."""
    from worker.tasks import run_chunk

    client = job_client(redis_server.url, queue="q", chunk_size=2, result_ttl_s=1000)
    r = redis_server.client()
    client.submit(make_items(6, prefix="old"), job_id="reuse")
    client.cancel("reuse")
    client.delete("reuse")
    assert len(queued_messages(redis_server, "q")) == 3  # the cancelled job's chunks are still queued

    until = r"its id stays reserved until 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    with pytest.raises(InvalidInputError, match=rf"job 'reuse' was deleted; {until} .*use a new id") as e:
        client.submit(make_items(6, prefix="new"), job_id="reuse")
    assert e.value.field == "job_id"
    with pytest.raises(NotFoundError, match=rf"job 'reuse' not found: it was deleted; {until}"):
        client.status("reuse")
    tombstone = "safety:job:{reuse}:deleted"
    assert 990 < r.ttl(tombstone) <= 1000  # the job's remaining TTL
    assert r.keys("safety:job:{reuse}*") == [tombstone]  # the refused submit stored nothing

    # a worker takes one of the deleted job's messages: skipped, nothing written, no dead letter
    task = SimpleNamespace(store=client.store, settings=client.settings, classifier=None)
    assert run_chunk(task, "reuse", 1) == {"job_id": "reuse", "chunk": 1, "action": "gone"}
    assert r.keys("safety:job:{reuse}*") == [tombstone] and r.llen(DEAD_LETTER) == 0
    # and a submitter of the deleted job still storing is stopped, writing nothing
    with pytest.raises(NotFoundError, match="disappeared while it was being submitted"):
        client.store.upload("reuse", 2, b'{"text": "old"}\n')
    assert r.keys("safety:job:{reuse}*") == [tombstone]

    r.delete(tombstone)  # the deleted job would have expired by now: the id is free
    assert not client.submit(make_items(2, prefix="new"), job_id="reuse").resumed


def test_every_key_of_a_job_has_a_ttl(redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=4, result_ttl_s=100)
    client.submit(make_items(10), job_id="ttl")
    store, keys, r = client.store, JobKeys("ttl"), redis_server.client()
    # the items and sent chunks expire with the record, to the millisecond, whatever this host's clock says
    record_ms, items_ms, sent_ms = r.pttl(keys.job), r.pttl(keys.items), r.pttl(keys.enqueued)
    assert 99_000 < record_ms <= 100_000 and abs(items_ms - record_ms) < 50 and abs(sent_ms - record_ms) < 50
    start = store.start_chunk("ttl", 0)
    store.record_error("ttl", 0, "boom")
    store.write("ttl", [(i, fake_result(i), False) for i in range(start.lo, start.hi)])
    ttls = store.ttls("ttl")
    assert set(ttls) == set(JobKeys("ttl").all())
    assert all(0 < t <= 100 for t in ttls.values()), ttls


def test_redelivered_results_count_once_and_the_job_finishes(
    redis_server: RedisServer, job_client: Client
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=3, result_ttl_s=50)
    client.submit(make_items(5), job_id="idem")
    store = client.store
    first = store.start_chunk("idem", 0)
    assert (first.action, first.attempt, first.lo, first.hi) == ("run", 1, 0, 3)
    assert store.start_chunk("idem", 0).attempt == 2  # a redelivery counts an attempt
    w1 = store.write("idem", [(i, fake_result(i, "first"), False) for i in range(3)], model="m1")
    w2 = store.write("idem", [(i, fake_result(i, "second"), False) for i in range(3)], model="m2")
    assert (w1.ok, w2.ok) == (3, 0)
    assert store.start_chunk("idem", 0).action == "complete"
    st = client.status("idem")
    assert (st.state, st.done, st.failed, st.model) == ("running", 3, 0, "m1")
    store.write("idem", [(3, fake_result(3), False), (4, json.dumps(failed_line(4, "x", "why")), True)])
    st = client.status("idem")
    assert (st.state, st.done, st.failed) == ("done", 4, 1)
    assert st.finished_at is not None and abs(st.finished_at - store.server_time()) < 60  # Redis's clock
    lines = list(client.results("idem"))
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[0]["id"] == "first" and lines[4]["error"] == "why"
    assert not redis_server.client().exists(JobKeys("idem").items)  # item texts are dropped once finished


def test_a_job_classified_across_a_model_rollout_names_both_models(
    redis_server: RedisServer, job_client: Client
) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    client.submit(make_items(6), job_id="rollout")
    store = client.store
    for chunk, model in ((0, "guard-2026-10"), (1, "guard-2026-11"), (2, "guard-2026-10")):
        store.write("rollout", [(i, fake_result(i), False) for i in (2 * chunk, 2 * chunk + 1)], model=model)
    st = client.status("rollout")
    assert (st.state, st.done, st.model) == ("done", 6, "guard-2026-10 + guard-2026-11")


def test_all_items_failed_means_the_job_failed(redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=10)
    client.submit(make_items(2), job_id="allbad")
    client.store.write("allbad", [(i, json.dumps(failed_line(i, None, "no")), True) for i in range(2)])
    assert client.status("allbad").state == "failed"


def test_a_write_never_recreates_a_vanished_job(redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url, queue="q")
    client.submit(make_items(3), job_id="gone")
    redis_server.client().flushall()  # what a Redis restart without persistence leaves
    store = client.store
    assert store.start_chunk("gone", 0).action == "gone"
    assert store.write("gone", [(0, fake_result(0), False)]).state == "gone"
    assert not store.record_error("gone", 0, "late error")
    assert not store.dead_letter("gone", 0, 3, "late")  # nobody would read it
    assert redis_server.client().keys("safety:job:*") == []
    assert redis_server.client().llen(DEAD_LETTER) == 0


def message_args(server: RedisServer, queue: str) -> dict[int, list[Any]]:
    """chunk -> the args of its queued message."""
    out = {}
    for m in queued_messages(server, queue):
        args = json.loads(base64.b64decode(m["body"]))[0]
        out[args[1]] = args
    return out


def test_every_chunk_message_carries_its_jobs_nonce(redis_server: RedisServer, job_client: Client) -> None:
    """A chunk message carried only (job id, chunk): nothing told one job from another that had its id."""
    client = job_client(redis_server.url, queue="q", chunk_size=2, result_ttl_s=1000)
    r, keys, items = redis_server.client(), JobKeys("gen"), make_items(6)
    client.submit(items, job_id="gen")
    nonce = r.hget(keys.job, "nonce")
    assert re.fullmatch(r"[0-9a-f]{32}", nonce or "")
    assert message_args(redis_server, "q") == {c: ["gen", c, nonce] for c in range(3)}
    r.srem(keys.enqueued, 2)  # an interrupted submit: the resume sends chunk 2 with the job's own nonce
    r.delete("q")
    assert client.submit(items, job_id="gen").sent == 1
    assert message_args(redis_server, "q") == {2: ["gen", 2, nonce]} and r.hget(keys.job, "nonce") == nonce
    r.delete("q", *keys.all())  # expired: a new job of that id is another generation
    client.submit(items, job_id="gen")
    assert r.hget(keys.job, "nonce") not in (None, nonce)
    assert message_args(redis_server, "q")[0] == ["gen", 0, r.hget(keys.job, "nonce")]


def test_a_message_acts_only_on_the_job_of_its_nonce(redis_server: RedisServer, job_client: Client) -> None:
    """Every script through which a chunk message acts on its job checks the message's nonce: another job's
    message counts no attempt and writes no result or error. A message without a nonce (the previous
    release's) is not checked; a record without one (the previous release's) refuses a message with one."""
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    client.submit(make_items(4), job_id="gen")
    r, keys, store = redis_server.client(), JobKeys("gen"), client.store
    nonce, other = r.hget(keys.job, "nonce"), "0" * 32
    assert store.start_chunk("gen", 0, other).action == "stale"
    assert store.write("gen", [(0, fake_result(0), False)], model="m", nonce=other).state == "stale"
    store.record_error("gen", 0, "not mine", nonce=other)
    assert not store.dead_letter("gen", 0, 3, "not mine", other)
    assert r.hlen(keys.attempts) == r.hlen(keys.results) == r.hlen(keys.errors) == 0
    assert r.llen(DEAD_LETTER) == 0 and store.dead_letters() == []
    assert "error" not in r.hgetall(keys.job) and r.hget(keys.job, "done") == "0"

    assert store.start_chunk("gen", 0, nonce).attempt == 1  # its own
    assert store.start_chunk("gen", 0).attempt == 2  # none: the previous release's, unchecked
    assert store.write("gen", [(0, fake_result(0), False)], model="m", nonce=nonce).ok == 1
    assert store.write("gen", [(1, fake_result(1), False)], model="m").ok == 1
    store.record_error("gen", 1, "mine", nonce=nonce)
    assert r.hget(keys.errors, "1") == "mine"

    r.hdel(keys.job, "nonce")  # a record the previous release created
    assert store.start_chunk("gen", 1).action == "run"
    assert store.start_chunk("gen", 1, nonce).action == "stale"
    assert store.write("gen", [(2, fake_result(2), False)], model="m", nonce=nonce).state == "stale"
    assert store.write("gen", [(2, fake_result(2), False)]).ok == 1


def test_cancel_skips_the_rest_and_says_so_per_item(redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=2)
    client.submit(make_items(5, prefix="c"), job_id="cancel-me")
    client.store.write("cancel-me", [(0, fake_result(0, "c-0"), False), (1, fake_result(1, "c-1"), False)])
    st = client.cancel("cancel-me")
    assert (st.state, st.done, st.finished) == ("cancelled", 2, True)
    assert client.cancel("cancel-me").state == "cancelled"
    assert client.store.start_chunk("cancel-me", 1).action == "cancelled"
    assert client.store.write("cancel-me", [(2, fake_result(2), False)]).state == "cancelled"
    lines = list(client.results("cancel-me", timeout=5))
    assert [(line["index"], line["id"]) for line in lines] == [(i, f"c-{i}") for i in range(5)]
    assert [line["error"] is None for line in lines] == [True, True, False, False, False]
    assert lines[3]["error"].startswith("cancelled") and lines[3]["scores"] is None
    with pytest.raises(NotFoundError):
        client.cancel("no-such-job")


def test_results_stream_in_item_order_as_chunks_land(redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url, queue="q", chunk_size=4)
    client.submit(make_items(12), job_id="order")
    landed = threading.Event()

    def workers() -> None:  # chunks complete out of order: 2, then 0, then 1
        for chunk in (2, 0, 1):
            time.sleep(0.1)
            lo = chunk * 4
            client.store.write("order", [(i, fake_result(i), False) for i in range(lo, lo + 4)])
        landed.set()

    thread = threading.Thread(target=workers)
    thread.start()
    got = [line["index"] for line in client.results("order", timeout=20, poll_s=0.02)]
    thread.join()
    assert landed.is_set() and got == list(range(12))
    assert [line["index"] for line in client.results("order", start=10)] == [10, 11]


def test_waiting_is_bounded(redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url, queue="nobody-listens")
    client.submit(make_items(3), job_id="slow")
    with pytest.raises(DeadlineExceededError, match="still queued"):
        client.wait("slow", timeout=0.3, poll_s=0.05)
    with pytest.raises(DeadlineExceededError, match="result 0 not ready"):
        list(client.results("slow", timeout=0.3, poll_s=0.05))


def test_a_job_that_disappears_is_reported_lost(redis_server: RedisServer, job_client: Client) -> None:
    client = job_client(redis_server.url, queue="nobody-listens")
    client.submit(make_items(3), job_id="lost")
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            client.wait("lost", timeout=30, poll_s=0.05)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    redis_server.client().flushall()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(errors[0], NotFoundError) and "disappeared while queued" in str(errors[0])
    with pytest.raises(NotFoundError, match="lost when Redis restarted without persistence"):
        client.status("lost")


def test_wait_and_results_ride_out_a_redis_restart_with_persistence(
    tmp_path: Any, job_client: Client
) -> None:
    """A one-second outage of a Redis with persistence ended `wait`/`results` with UnavailableError at
    once, although the job was still there when Redis came back, and completed."""
    server = RedisServer(tmp_path / "aof", appendonly=True).start()
    try:
        client = job_client(server.url, queue="nobody-listens", chunk_size=4)
        said: list[str] = []
        client.notice = said.append
        client.submit(make_items(8), job_id="blip")
        client.store.write("blip", [(i, fake_result(i), False) for i in range(4)])  # chunk 0 is done
        lines: list[dict[str, Any]] = []

        def stream() -> None:
            lines.extend(client.results("blip", timeout=60, poll_s=0.05, outage_s=30))

        streaming, streamed = in_thread(stream)
        waiting, waited = in_thread(lambda: client.wait("blip", timeout=60, poll_s=0.05, outage_s=30))
        poll(lambda: len(lines) == 4, 10, "the first chunk's lines")
        server.kill()
        poll(lambda: sum("retrying for up to 30s" in m for m in said) >= 2, 10, "both to notice the outage")
        assert streaming.is_alive() and waiting.is_alive(), (streamed, waited)  # riding it out
        server.start()  # the same append-only file: the job is back
        JobClient(WorkerSettings(redis_url=server.url)).store.write(
            "blip", [(i, fake_result(i), False) for i in range(4, 8)]
        )
        streaming.join(30)
        waiting.join(30)
        assert streamed == [None] and [line["index"] for line in lines] == list(range(8))
        assert waited[0].state == "done", waited
        assert any("Redis answers again" in m for m in said), said
        assert "is unreachable" in said[0] and "job blip" in said[0], said
    finally:
        server.kill()


def test_a_redis_outage_longer_than_the_budget_ends_the_wait_naming_the_job(
    redis_server: RedisServer, job_client: Client
) -> None:
    client = job_client(redis_server.url, queue="nobody-listens")
    said: list[str] = []
    client.notice = said.append
    client.submit(make_items(3), job_id="down")
    redis_server.kill()
    for call in (
        lambda: client.wait("down", poll_s=0.05, outage_s=1),
        lambda: list(client.results("down", poll_s=0.05, outage_s=1)),
        lambda: client.status("down", outage_s=1),
    ):
        began = time.monotonic()
        with pytest.raises(UnavailableError) as e:
            call()
        assert 1 <= time.monotonic() - began < 6
        assert str(e.value).startswith("job 'down': Redis at redis://") and "no answer for 1s" in str(e.value)
    assert len(said) == 3 and all("retrying for up to 1s" in m for m in said), said
    began = time.monotonic()  # the call's own timeout bounds the retries too, and is what ends them
    with pytest.raises(
        DeadlineExceededError,
        match=r"Connection refused; no answer for 0s of retrying when the timeout ran out$",
    ):
        client.wait("down", timeout=0.3, poll_s=0.05, outage_s=30)
    assert time.monotonic() - began < 5
    assert said[-1].endswith("; retrying for up to 1s"), said  # what is left of the timeout, not 30s
    with pytest.raises(UnavailableError):  # no outage_s: at once, as before
        client.wait("down")


def test_a_redis_that_hangs_is_ridden_out_within_the_timeout_and_the_budget(
    redis_server: RedisServer, job_client: Client
) -> None:
    """With Redis paused (kill -STOP) instead of refusing connections, each read waited out the 15 s socket
    timeout, and the outage was timed from the end of the first one: `--timeout 20` took 32 s and ended
    "no answer for 15s of retrying" after a notice "retrying for up to 60s", as UnavailableError, not a
    timeout; with no timeout, the 60 s budget took 79 s ("no answer for 62s")."""
    client = job_client(redis_server.url, queue="nobody-listens")
    said: list[str] = []
    client.notice = said.append
    client.submit(make_items(3), job_id="hung")
    with redis_server.paused():
        for call in (
            lambda: client.wait("hung", timeout=4, poll_s=0.05, outage_s=60),
            lambda: list(client.results("hung", timeout=4, poll_s=0.05, outage_s=60)),
            lambda: client.status("hung", timeout=4, outage_s=60),
        ):
            said.clear()
            began = time.monotonic()
            with pytest.raises(DeadlineExceededError) as e:
                call()
            took = time.monotonic() - began
            assert 4 <= took < 12, took  # the timeout, and no 15 s read past it
            message = str(e.value)
            assert message.startswith("job 'hung': Redis at redis://") and "Timeout" in message, message
            assert re.search(r"no answer for [3-5]s of retrying when the timeout ran out$", message)
            [notice] = said
            assert 0 < retry_figure(notice) <= 4, notice  # the time left, not the 60 s budget
        began = time.monotonic()  # no timeout: the budget, counted from the first read that hung
        with pytest.raises(UnavailableError) as e:
            client.wait("hung", poll_s=0.05, outage_s=3)
        assert 3 <= time.monotonic() - began < 11
        assert re.search(r"no answer for [34]s of retrying$", str(e.value)), str(e.value)
    assert client.status("hung", outage_s=60).state == "queued"  # and it answers again


def test_a_redis_that_comes_back_empty_ends_a_riding_wait_saying_the_job_is_lost(
    redis_server: RedisServer, job_client: Client
) -> None:
    client = job_client(redis_server.url, queue="nobody-listens")
    said: list[str] = []
    client.notice = said.append
    client.submit(make_items(3), job_id="gone")
    seen = threading.Event()
    waiting, waited = in_thread(
        lambda: client.wait("gone", timeout=60, poll_s=0.05, outage_s=30, on_progress=lambda st: seen.set())
    )
    assert seen.wait(10)  # it read the job once
    redis_server.kill()
    poll(lambda: said, 10, "the wait to notice the outage")
    redis_server.start()  # no persistence: empty
    waiting.join(30)
    assert isinstance(waited[0], NotFoundError), waited
    assert "disappeared while queued" in str(waited[0]) and "submit it again" in str(waited[0])


def test_redis_down_is_unavailable_at_once(job_client: Client) -> None:
    client = job_client(f"redis://:secret@127.0.0.1:{free_port()}/0")
    for call in (
        lambda: client.submit(make_items(2)),
        lambda: client.status("x"),
        lambda: client.cancel("x"),
    ):
        began = time.monotonic()
        with pytest.raises(UnavailableError, match="is unreachable") as e:
            call()
        assert time.monotonic() - began < 10
        assert "secret" not in str(e.value)
