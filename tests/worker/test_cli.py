"""The batch command line in process: where result lines go (--out), reading items, argument checks."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import worker.cli
from model.errors import InvalidInputError
from tests.worker.harness import (
    RedisServer,
    Spools,
    free_port,
    long_items,
    poll,
    retry_figure,
    traced_peak,
    worker_env,
)
from worker.cli import ItemsFile, _check_out, _write_results, main, register
from worker.jobs import JobClient
from worker.settings import WorkerSettings
from worker.store import JobKeys, JobStore


class Lines:
    """Stands in for the job client: `results` yields `n` result lines."""

    def __init__(self, n: int) -> None:
        self.n = n

    def results(self, job_id: str, **options: Any) -> Iterator[dict[str, Any]]:
        for i in range(self.n):
            yield {"index": i, "id": str(i), "error": None}


def test_out_through_a_symlink_writes_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to("real.jsonl")
    assert _write_results(Lines(3), "j", str(link), None) == 3
    assert link.is_symlink() and os.readlink(link) == "real.jsonl"
    assert len(real.read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]  # no partial left


def test_out_a_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "sub" / "new.jsonl")
    _write_results(Lines(2), "j", str(link), None)
    assert link.is_symlink() and len((tmp_path / "sub" / "new.jsonl").read_text().splitlines()) == 2


def test_out_a_fifo_is_written_in_place_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    _write_results(Lines(4), "j", str(fifo), None)
    reader.join(10)
    assert len(got[0].splitlines()) == 4
    assert fifo.is_fifo() and not (tmp_path / "pipe.partial").exists()


def test_out_a_character_device_stays_a_device(tmp_path: Path) -> None:
    """`--out /dev/null` as root used to replace the device with a regular file; a device node of the test's
    own (never the real /dev/null) shows the same."""
    node = tmp_path / "mynull"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("making a device node needs root")
    _check_out(str(node))
    _write_results(Lines(2), "j", str(node), None)
    assert stat.S_ISCHR(node.stat().st_mode) and not (tmp_path / "mynull.partial").exists()


def test_out_a_directory_is_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"^--out: cannot write .*: it is a directory"):
        _check_out(str(tmp_path))
    link = tmp_path / "to-dir"
    link.symlink_to(tmp_path)
    with pytest.raises(InvalidInputError, match="is a directory"):
        _check_out(str(link))


def test_out_in_a_directory_that_does_not_exist_says_so(tmp_path: Path) -> None:
    """It said `DIR is not a directory` for a directory that is not there at all."""
    missing = tmp_path / "nonexist" / "dir"
    with pytest.raises(InvalidInputError) as e:
        _check_out(str(missing / "r.jsonl"))
    assert str(e.value) == f"--out: cannot write {missing}/r.jsonl: {missing} does not exist; create it first"
    (tmp_path / "file").write_text("")
    with pytest.raises(
        InvalidInputError, match=f"^--out: cannot write .*: {tmp_path}/file is not a directory$"
    ):
        _check_out(str(tmp_path / "file" / "r.jsonl"))


def test_ctrl_c_during_validation_says_nothing_was_submitted(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """It said "interrupted; job X goes on. Resume with: ..." for a job that did not exist."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)

    def ctrl_c(self: JobClient, items: Any) -> Any:  # the user presses Ctrl-C while the items are checked
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(JobClient, "_validate", ctrl_c)
    assert main(["submit", str(src), "--job-id", "never-sent"]) == 130
    said = capsys.readouterr().err
    assert "it submitted nothing" in said and "goes on" not in said and "Resume" not in said, said
    assert redis_server.client().dbsize() == 0


def test_a_submit_whose_job_is_cancelled_meanwhile_stops_and_exits_1(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """It uploaded every item anyway, printed "submitted" and exited 0."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f'{{"text": "item {i}"}}\n' for i in range(5)))
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_CHUNK_SIZE", "1")
    monkeypatch.setenv("SAFETY_QUEUE", "cli-cancelled")
    upload = JobStore.upload

    def upload_then_cancel(store: JobStore, job: str, first: int, items: Any) -> bool:
        if first == 1:  # `safety job cancel` from another terminal, after chunk 0 was sent
            store.cancel(job)
        return upload(store, job, first, items)

    monkeypatch.setattr(JobStore, "upload", upload_then_cancel)
    assert main(["submit", str(src), "--job-id", "cancelled-meanwhile", "--wait", "--no-progress"]) == 1
    out = capsys.readouterr()
    assert "job cancelled-meanwhile was cancelled: this submit sent 1 chunk of 5 and stopped" in out.err
    assert out.out == ""
    assert redis_server.client().llen("cli-cancelled") == 1
    # without --wait too (docs/jobs.md's exit codes: the one exception to "0 whatever the job's state")
    assert main(["submit", str(src), "--job-id", "cancelled-meanwhile"]) == 1
    out = capsys.readouterr()
    assert "job cancelled-meanwhile was cancelled: this submit sent 0 chunks of 5 and stopped" in out.err
    assert out.out == ""  # no job id printed: nothing to pipe into `safety job results`


def test_a_submit_of_a_job_another_submit_holds_says_so_waits_and_resumes(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f'{{"text": "item {i}"}}\n' for i in range(5)))
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_CHUNK_SIZE", "2")
    monkeypatch.setenv("SAFETY_QUEUE", "cli-held")
    monkeypatch.setattr(JobClient, "submit_lease_s", 0.5)
    assert main(["submit", str(src), "--job-id", "held"]) == 0
    r, keys = redis_server.client(), JobKeys("held")
    r.srem(keys.enqueued, 2)  # the submit that holds the job has not queued its last chunk yet
    r.lpop("cli-held")
    r.set(keys.submitter, "another-submits-token", px=500)  # and dies now
    capsys.readouterr()
    assert main(["submit", str(src), "--job-id", "held"]) == 0
    err = capsys.readouterr().err
    assert "safety submit: job held is being submitted by another process; waiting up to 2s for it" in err
    assert "resumed job held: 5 items, 1 chunk sent" in err, err
    assert r.llen("cli-held") == 3


class Stderr:
    """What the command run in another thread wrote on stderr so far (capsys, read as it comes)."""

    def __init__(self, capsys: pytest.CaptureFixture) -> None:
        self.capsys = capsys
        self.text = ""

    def __call__(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


def submit_wait_in_thread(src: Path, job: str, out: Path) -> tuple[threading.Thread, list[int]]:
    """`safety submit SRC --job-id JOB --wait --out OUT` in a thread; the list gets its exit status."""
    code: list[int] = []
    argv = ["submit", str(src), "--job-id", job, "--wait", "--no-progress", "--out", str(out)]
    thread = threading.Thread(target=lambda: code.append(main(argv)))
    thread.start()
    return thread, code


def test_submit_wait_that_loses_redis_for_longer_than_it_rides_out_names_the_job_and_what_next(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """It said only `safety submit: Redis at redis://… is unreachable: Error 111 …`, at the first failed
    read, and exit 2: no job id, nothing about what to do."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-outage")  # nobody classifies: the job waits
    monkeypatch.setattr("worker.cli.REDIS_OUTAGE_S", 1.0)
    err = Stderr(capsys)
    thread, code = submit_wait_in_thread(src, "outage", out)
    poll(lambda: "submitted job outage" in err(), 10, "the submit to wait for its job")
    redis_server.kill()
    thread.join(30)
    assert code == [2]
    said = err()
    assert f"safety submit: job outage: Redis at {redis_server.url} is unreachable" in said, said
    assert "retrying for up to 1s" in said
    final = said.splitlines()[-1]
    assert final.startswith(f"safety submit: job 'outage': Redis at {redis_server.url} is unreachable"), final
    assert "no answer for 1s of retrying" in final
    for step in (
        "`safety job status outage`",
        f"`safety job results outage --out {out}`",
        "If Redis restarted without persistence, the job is lost: submit it again",
        f"`safety submit {src} --job-id outage --wait --out {out}`",
    ):
        assert step in final, (step, final)
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_submit_that_loses_redis_while_sending_names_the_job_and_how_to_resume(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """It said only `safety submit: Redis at … is unreachable: …`: neither the job nor that the same command
    with its --job-id resumes it (docs/jobs.md)."""
    from worker.jobs import JobClient

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-send-outage")
    send = JobClient.send

    def send_after_redis_died(self: JobClient, *args: Any, **kwargs: Any) -> Any:
        redis_server.kill()  # Redis goes away as the items are sent
        return send(self, *args, **kwargs)

    monkeypatch.setattr(JobClient, "send", send_after_redis_died)
    assert main(["submit", str(src), "--job-id", "halfway", "--wait", "--out", str(tmp_path / "o")]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"safety submit: Redis at {redis_server.url} is unreachable"), said
    resume = f"safety submit {src} --job-id halfway --wait --out {tmp_path / 'o'}"
    assert said.endswith(
        f"; job halfway may be partly submitted: once Redis answers, resume it with: {resume}\n"
    ), said


def test_job_results_with_redis_down_retries_then_says_what_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("SAFETY_REDIS_URL", url)
    monkeypatch.setattr("worker.cli.REDIS_OUTAGE_S", 1.0)
    assert main(["job", "results", "some-job", "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"safety job results: job some-job: Redis at {url} is unreachable" in err
    assert (
        "`safety job status some-job`" in err
        and f"`safety job results some-job --out {tmp_path}/r.jsonl`" in err
    )
    assert "`safety submit FILE --job-id some-job`" in err


def test_job_results_of_a_cancelled_job_deleted_meanwhile_fails_and_leaves_no_out_file(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`safety job results J --out f` of a cancelled job deleted while it read wrote made-up `"id": null`
    "cancelled before it was submitted" lines for the items the job had stored, renamed f into place, then
    failed on its last status read (exit 2, a whole-looking f)."""
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    settings = WorkerSettings(redis_url=redis_server.url, queue="cli-vanish", chunk_size=2)
    other = JobClient(settings)  # another terminal
    try:
        other.submit([{"id": f"m{i}", "text": f"item {i}"} for i in range(6)], job_id="vanish")
        lines = [(i, json.dumps({"index": i, "id": f"m{i}", "error": None}), False) for i in range(2)]
        other.store.write("vanish", lines)
        other.cancel("vanish")
        read = JobStore.results

        def read_then_delete(store: JobStore, job_id: str, lo: int, hi: int) -> list[str | None]:
            got = read(store, job_id, lo, hi)
            if lo == 0:  # `safety job delete vanish` right after the first read
                other.delete("vanish")
            return got

        monkeypatch.setattr(JobStore, "results", read_then_delete)
        out = tmp_path / "r.jsonl"
        assert main(["job", "results", "vanish", "--out", str(out)]) == 2
    finally:
        other.close()
    err = capsys.readouterr().err
    assert err.startswith("safety job results: job 'vanish' not found: it was deleted"), err
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_job_results_with_redis_hung_keeps_to_its_timeout_and_says_it_ran_out(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """With Redis paused (kill -STOP) during `safety job results J --timeout 20`: 32 s, a notice "retrying
    for up to 60s", then "no answer for 15s of retrying" as an outage (what to do once Redis is back), not
    as the timeout it was."""
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    JobClient(WorkerSettings(redis_url=redis_server.url, queue="cli-hung")).submit(
        [{"text": "one"}], job_id="hung"
    )
    out = tmp_path / "r.jsonl"
    with redis_server.paused():
        began = time.monotonic()
        assert main(["job", "results", "hung", "--out", str(out), "--timeout", "4"]) == 2
        took = time.monotonic() - began
    assert 4 <= took < 12, took
    err = capsys.readouterr().err
    notice, final = err.splitlines()
    assert notice.startswith("safety job results: job hung: Redis at redis://") and "Timeout" in notice, err
    assert 0 < retry_figure(notice) <= 4, notice  # the time left, not the 60 s budget
    assert final.startswith("safety job results: job 'hung': Redis at redis://"), final
    assert final.endswith(
        "of retrying when the timeout ran out; the job goes on: run `safety job results hung --out "
        f"{out}` again, with a longer --timeout or none"
    ), final
    assert not out.exists()


def test_job_results_reads_the_jobs_outcome_within_its_timeout(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """After the last result line, the job's status (for the exit code) was read with the 60 s outage budget
    whatever --timeout said: a Redis that hung then kept `--timeout 3` going for 30 s and more."""
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    client = JobClient(WorkerSettings(redis_url=redis_server.url, queue="cli-outcome"))
    try:
        client.submit([{"text": "one"}], job_id="outcome")
        client.store.write("outcome", [(0, json.dumps({"index": 0, "id": "0", "error": None}), False)])
    finally:
        client.close()
    write = worker.cli._write_results

    def write_then_hang(*args: Any, **kwargs: Any) -> int:
        written = write(*args, **kwargs)
        stack.enter_context(redis_server.paused())  # Redis stops answering after the last line
        return written

    monkeypatch.setattr(worker.cli, "_write_results", write_then_hang)
    out = tmp_path / "r.jsonl"
    with contextlib.ExitStack() as stack:
        began = time.monotonic()
        assert main(["job", "results", "outcome", "--out", str(out), "--timeout", "3"]) == 2
        took = time.monotonic() - began
    assert 3 <= took < 11, took
    final = capsys.readouterr().err.splitlines()[-1]
    assert "of retrying when the timeout ran out; the job goes on: run `safety job results" in final, final
    assert len(out.read_text().splitlines()) == 1  # the results are all there


def test_submit_wait_timeout_is_one_deadline_for_the_wait_and_the_results(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`submit --wait --timeout 3` gave the wait 3 s and the results another 3 s: a job that finished 2 s in,
    then a Redis that hung while its results were read, kept the command going for 5 s and more. --timeout
    is one deadline from the submission on, as `job results --timeout` is for its results and outcome."""
    src, out = tmp_path / "in.jsonl", tmp_path / "r.jsonl"
    src.write_text('{"text": "one"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-one-deadline")  # no worker: the test writes the result
    writer = JobClient(WorkerSettings(redis_url=redis_server.url, queue="cli-one-deadline"))
    line = json.dumps({"index": 0, "id": "0", "error": None})
    wait = worker.cli._wait_with_progress

    def wait_then_hang(*args: Any, **kwargs: Any) -> Any:
        # the job's one chunk takes 2 s of the 3, as a worker's would; then Redis hangs for the results
        timer = threading.Timer(2.0, lambda: writer.store.write("late", [(0, line, False)]))
        timer.start()
        try:
            status = wait(*args, **kwargs)
        finally:
            timer.join()
        assert status.state == "done"
        stack.enter_context(redis_server.paused())
        return status

    monkeypatch.setattr(worker.cli, "_wait_with_progress", wait_then_hang)
    argv = ["submit", str(src), "--job-id", "late", "--wait", "--timeout", "3", "--no-progress"]
    try:
        with contextlib.ExitStack() as stack:
            began = time.monotonic()
            assert main([*argv, "--out", str(out)]) == 2
            took = time.monotonic() - began
    finally:
        writer.close()
    assert 3 <= took < 4.3, took  # 3 s and the last try's answer timeout; not 2 s + 3 s
    err = capsys.readouterr().err.splitlines()
    assert 0 < retry_figure(err[-2]) <= 2, err  # the ~1 s the wait left, not --timeout's 3
    assert err[-1].startswith("safety submit: job 'late': Redis at redis://"), err
    assert err[-1].endswith(
        "of retrying when the timeout ran out; the job is done, its results are kept: `safety job results "
        f"late --out {out}` writes them"
    ), err
    assert not out.exists()
    assert main(["job", "results", "late", "--out", str(out)]) == 0  # what the message says to run
    assert out.read_text() == line + "\n"


def test_submit_wait_rides_out_a_redis_that_comes_back_empty_and_says_the_job_is_lost(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-emptied")
    err = Stderr(capsys)
    thread, code = submit_wait_in_thread(src, "emptied", out)
    poll(lambda: "submitted job emptied" in err(), 10, "the submit to wait for its job")
    redis_server.kill()
    poll(lambda: "retrying for up to 60s" in err(), 10, "the submit to notice the outage")
    redis_server.start()  # without persistence: empty
    thread.join(30)
    assert code == [2]
    final = err().splitlines()[-1]
    assert final.startswith("safety submit: job 'emptied' disappeared while queued"), final
    assert "submit it again" in final


def test_job_dead_letters_prints_the_newest_entries_one_json_line_each(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """There was no command for them: only the Python API, `JobClient.dead_letters`."""
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-dead")
    assert main(["job", "dead-letters"]) == 0 and capsys.readouterr().out == ""  # none yet
    client = JobClient.from_env()
    client.submit([{"text": str(i)} for i in range(4)], job_id="dead")
    for chunk in (0, 2, 1):  # what workers dead-letter after SAFETY_MAX_ATTEMPTS, in this order
        client.store.dead_letter("dead", chunk, 3, f"gave up: chunk {chunk} crashed its worker")
    client.close()
    assert main(["job", "dead-letters"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["job_id"], e["chunk"], e["attempts"]) for e in entries] == [("dead", c, 3) for c in (1, 2, 0)]
    assert entries[0]["error"] == "gave up: chunk 1 crashed its worker"
    assert entries[0]["at"] >= entries[1]["at"] >= entries[2]["at"] > 0
    assert main(["job", "dead-letters", "--limit", "2"]) == 0
    assert [json.loads(line)["chunk"] for line in capsys.readouterr().out.splitlines()] == [1, 2]
    with pytest.raises(SystemExit) as e:
        main(["job", "dead-letters", "--limit", "0"])
    assert e.value.code == 2 and "--limit: must be a positive integer, got 0" in capsys.readouterr().err


def test_job_delete_prints_the_deleted_job_and_refuses_an_open_one(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-delete")
    client = JobClient.from_env()
    client.submit([{"text": "one"}], job_id="cli-del")
    assert main(["job", "delete", "cli-del"]) == 2
    assert (
        "safety job delete: job 'cli-del' is queued: only a finished or cancelled job"
        in capsys.readouterr().err
    )
    client.cancel("cli-del")
    assert main(["job", "delete", "cli-del"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "cancelled"
    assert main(["job", "delete", "cli-del"]) == 2 and "not found" in capsys.readouterr().err
    client.close()


@pytest.fixture
def not_redis() -> Iterator[str]:
    """A TCP server that answers like an HTTP server: the URL of something that is not Redis."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    server.close()


def test_a_redis_url_redis_refuses_is_one_line_naming_the_variable_exit_2(
    redis_server: RedisServer,
    not_redis: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A DB index out of range (ResponseError) or a server that is not Redis (InvalidResponse) crashed
    with a traceback, exit 1."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n')
    db99 = redis_server.url.rsplit("/", 1)[0] + "/99"
    for url, why in ((db99, "DB index is out of range"), (not_redis, "does not answer as Redis does")):
        monkeypatch.setenv("SAFETY_REDIS_URL", url)
        for argv in (["job", "status", "x"], ["submit", str(src)], ["job", "results", "x"]):
            assert main(argv) == 2, (url, argv)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "field 'SAFETY_REDIS_URL'" in err and why in err, (argv, err)


def test_a_worker_given_a_redis_url_redis_refuses_exits_2_at_once(redis_server: RedisServer) -> None:
    """It retried "Cannot connect" for ever."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFETY_")}
    env.update(SAFETY_REDIS_URL=redis_server.url.rsplit("/", 1)[0] + "/99", SAFETY_WORKER_METRICS_PORT="0")
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker", "--pool=solo"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "safety worker: environment: field 'SAFETY_REDIS_URL': " in done.stderr
    assert "DB index is out of range" in done.stderr


def test_a_debug_worker_logs_no_celery_internals_before_celery_sets_up_its_logging(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Text logs at DEBUG: what Celery logs before its own setup (dumps of the code it generates, records of
    several lines) went to our early handler; from its setup on, its DEBUG records are its own."""
    log = tmp_path / "worker.log"
    env = worker_env(redis_server.url, tiny_model_dir, queue="debug-log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--pool=solo", "--loglevel=debug"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        poll(lambda: " ready." in log.read_text(), 60, "the worker to be ready")
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert "celery.utils.functional" not in text and "def chain(" not in text, text[:3000]
    assert "DEBUG/MainProcess" in text  # DEBUG itself still works, in Celery's format


@pytest.mark.parametrize("wait", [False, True])
def test_results_into_a_pipe_closed_early_stop_quietly_with_141(
    redis_server: RedisServer, tmp_path: Path, wait: bool
) -> None:
    """`safety job results J | head -1` (and `submit --wait | head`) ended in a BrokenPipeError traceback,
    exit 1."""
    client = JobClient(WorkerSettings(redis_url=redis_server.url, queue="pipe", chunk_size=5000))
    items = [{"text": f"item {i}"} for i in range(3000)]  # 3000 lines: far more than a pipe buffers
    client.submit(items, job_id="piped")
    line = json.dumps({"index": 0, "scores": {"x": 0.5}, "padding": "x" * 100})
    client.store.write("piped", [(i, line, False) for i in range(3000)])
    client.close()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in items))
    argv = (
        ["submit", str(src), "--job-id", "piped", "--wait", "--no-progress"]
        if wait
        else ["job", "results", "piped"]
    )
    env = {
        **os.environ,
        "SAFETY_REDIS_URL": redis_server.url,
        "SAFETY_QUEUE": "pipe",
        "SAFETY_CHUNK_SIZE": "5000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *argv],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["index"] == 0
    proc.stdout.close()  # what `head -1` does after its line
    assert proc.wait(60) == 141
    err = proc.stderr.read()
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_byte_order_mark_before_the_first_item_is_not_part_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows editors write one; the first line was refused as "not valid JSON"."""
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    with ItemsFile(str(src)) as items:
        assert list(items) == [{"text": "one"}, {"text": "two"}]
        assert items.line_of(1) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO('\ufeff{"text": "one"}\n'))
    with ItemsFile("-") as items:
        assert list(items) == [{"text": "one"}]
        assert items.line_of(0) == 1


def test_lines_end_at_lf_only_as_in_classify_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone CR between JSON tokens is whitespace, as `safety classify --jsonl` (model.jsonl) reads it; the
    submit reader split the line there (universal newlines) and refused half an item. CRLF still works."""
    data = b'{"text":\r"one"}\n{"text": "two"}\r\n\r\n{"text": "three"}'
    src = tmp_path / "cr.jsonl"
    src.write_bytes(data)
    with ItemsFile(str(src)) as items:
        assert list(items) == [{"text": "one"}, {"text": "two"}, {"text": "three"}]
        assert items.line_of(2) == 4
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    with ItemsFile("-") as items:
        assert list(items) == [{"text": "one"}, {"text": "two"}, {"text": "three"}]


@pytest.mark.parametrize("source", ["file", "stdin"])
@pytest.mark.parametrize("good_lines", [1, 2000])
def test_a_line_that_is_not_utf8_is_refused_by_its_line_without_a_traceback(
    source: str,
    good_lines: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A Latin-1 byte in the items was a UnicodeDecodeError traceback (exit 1) from the text stream's
    read-ahead, which decodes a chunk of 8 KB ahead of the line being parsed (2,000 lines: past the first)."""
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"text": "fine"}\n' * good_lines + b'{"text": "caf\xe9"}\n{"text": "after"}\n')
    argument, name = items_argument(source, src, monkeypatch)
    assert main(["submit", argument]) == 2  # refused before Redis is needed
    assert capsys.readouterr().err == (
        f"safety submit: {name} line {good_lines + 1}: "
        "not valid UTF-8 (invalid continuation byte at byte 13)\n"
    )


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_line_nested_too_deeply_is_refused_by_its_line_without_a_traceback(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """200,000 '[' raised RecursionError out of json.loads: a traceback, exit 1."""
    src = tmp_path / "deep.jsonl"
    src.write_text('{"text": "fine"}\n' + "[" * 200_000 + "\n")
    argument, name = items_argument(source, src, monkeypatch)
    assert main(["submit", argument]) == 2  # refused before Redis is needed
    assert (
        capsys.readouterr().err
        == f"safety submit: {name} line 2: not valid JSON (nested too deeply to parse)\n"
    )


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_bad_byte_after_good_non_ascii_lines_is_refused_by_its_line(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Only a line that is not ASCII is looked at for bytes that were not UTF-8: accented, CJK and emoji
    lines pass, and a bad byte in a line with good multi-byte characters is still named, with its offset."""
    src = tmp_path / "mixed.jsonl"
    good = '{"text": "caf\u00e9 \u4e2d\u6587 \U0001f600"}\n'.encode()
    src.write_bytes(good * 3 + b'{"text": "\xe4\xb8\xad \xff"}\n' + good)
    argument, name = items_argument(source, src, monkeypatch)
    assert main(["submit", argument]) == 2
    assert capsys.readouterr().err == (
        f"safety submit: {name} line 4: not valid UTF-8 (invalid start byte at byte 14)\n"
    )


def test_a_lone_surrogate_read_as_text_is_the_items_error_not_a_bad_byte(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A text stream without bytes (a StringIO as stdin) may hold a lone surrogate that no decoder made: it is
    not a byte that was not UTF-8, so the item's own check names it, by its line."""
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"text": "fine"}\n\n{"text": "x\ud800"}\n'))
    assert main(["submit", "-"]) == 2
    assert capsys.readouterr().err == (
        "safety submit: stdin line 3: items[1].text: has a lone surrogate '\\ud800' at character 1; it must "
        "be valid Unicode\n"
    )


def write_large_items(path: Path, n: int, *, bad: int | None = None) -> int:
    """`n` items of ~200 characters as JSONL, after a byte order mark, with a blank line before every 1000th
    (line numbers are not indexes); item `bad` gets a role no check lets through. Returns its line number."""
    number, bad_line = 0, 0
    with path.open("w", encoding="utf-8") as f:
        f.write("\ufeff")
        for i, item in enumerate(long_items(n)):
            if i and i % 1000 == 0:
                f.write("\n")
                number += 1
            if i == bad:
                item["role"] = "narrator"
                bad_line = number + 1
            f.write(json.dumps(item) + "\n")
            number += 1
    return bad_line


def items_argument(source: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """The `safety submit` argument reading `path` as `source` (a file or stdin), and how errors name it."""
    if source == "file":
        return str(path), str(path)
    monkeypatch.setattr(sys, "stdin", path.open(encoding="utf-8"))  # `safety submit - < FILE`
    return "-", "stdin"


# Both tests below: the old submit held the file's parsed items and their line numbers in lists, then the
# normalized items, then their canonical lines: a traced peak of 29 MB for 20,000 items of ~200 characters
# sent, 33 MB for 40,000 refused by their last but two. The streamed submit holds one item while checking
# and one 500-item chunk (~150 KB) with its Redis command while sending: 0.1 and 0.6 MB measured, whatever
# the number of items. 4 MB leaves room on both sides.
PEAK_BOUND = 4_000_000


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_bad_item_late_in_a_large_file_refuses_the_job_by_its_line_with_nothing_stored(
    source: str,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    spools: Spools,
) -> None:
    """Items are checked as they stream through the spool: the last but two of 40,000 still refuses the whole
    job before anything is stored, naming its line, and leaves no spool open."""
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    n = 40_000
    bad_line = write_large_items(tmp_path / "in.jsonl", n, bad=n - 3)
    argument, name = items_argument(source, tmp_path / "in.jsonl", monkeypatch)
    code, peak = traced_peak(lambda: main(["submit", argument, "--job-id", "late"]))
    assert code == 2
    assert capsys.readouterr().err == (
        f"safety submit: {name} line {bad_line}: items[{n - 3}].role: must be one of ('prompt', 'response'), "
        "got 'narrator'\n"
    )
    assert bad_line == n - 3 + 1 + (n - 3) // 1000
    assert redis_server.client().dbsize() == 0
    assert spools.all_closed()
    assert peak < PEAK_BOUND, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_submit_stores_a_large_file_or_stdin_in_a_chunks_memory(
    source: str,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    spools: Spools,
) -> None:
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-large")
    monkeypatch.setenv("SAFETY_CHUNK_SIZE", "500")
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "one"}\n')
    assert main(["submit", str(small), "--job-id", "warm-up"]) == 0  # Celery, kombu's transport: imported
    n = 20_000
    write_large_items(tmp_path / "in.jsonl", n)
    argument, _ = items_argument(source, tmp_path / "in.jsonl", monkeypatch)
    capsys.readouterr()
    code, peak = traced_peak(lambda: main(["submit", argument, "--job-id", "large"]))
    assert code == 0
    said = capsys.readouterr()
    assert said.out == "large\n"
    assert said.err == "submitted job large: 20000 items, 40 chunks sent\n"
    r = redis_server.client()
    assert r.hlen(JobKeys("large").items) == n and r.llen("cli-large") == 1 + 40
    last = next(itertools.islice(long_items(n), n - 1, None))
    assert json.loads(r.hget(JobKeys("large").items, str(n - 1))) == {"role": "prompt", **last}
    assert spools.all_closed()
    assert peak < PEAK_BOUND, f"peak {peak / 1e6:.1f} MB"


def spool_capped(limit: int) -> None:
    """In the child: files may grow to `limit` bytes (a write past it fails with EFBIG, as on a full TMPDIR,
    instead of raising SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


LIBRARY_SUBMIT = """
import sys
from worker.jobs import JobClient
items = ({"text": "spooled item %d " % i + "x" * 100} for i in range(5000))
try:
    JobClient.from_env().submit(items, job_id="spool-full")
except Exception as e:
    print(type(e).__module__ + "." + type(e).__name__, e, sep=": ")
    sys.exit(3)
"""


@pytest.mark.parametrize("source", ["file", "stdin", "library"])
def test_a_temporary_directory_that_cannot_hold_the_items_is_named_before_anything_is_stored(
    source: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A spool write that fails (EFBIG here; ENOSPC on a full TMPDIR) is named as such, before anything is
    stored: it was reported as `cannot read FILE`, and a library caller got a bare OSError (closing the
    spool re-flushed the failed buffer and replaced the error)."""
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"spooled item {i} " + "x" * 100}) + "\n" for i in range(5000))
    )
    env = {**os.environ, "SAFETY_REDIS_URL": redis_server.url, "SAFETY_QUEUE": "spool-full",
           "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(tmp_path)}  # fmt: skip
    argv = {
        "file": ["-m", "worker.cli", "submit", str(src)],
        "stdin": ["-m", "worker.cli", "submit", "-"],
        "library": ["-c", LIBRARY_SUBMIT],
    }[source]
    with open(src, "rb") as stdin:
        done = subprocess.run(
            [sys.executable, *argv], env=env, stdin=stdin, capture_output=True, text=True, timeout=60,
            preexec_fn=lambda: spool_capped(64 * 1024),
        )  # fmt: skip
    said = (
        f"cannot write the job's items in a temporary file in {tmp_path} (set TMPDIR to a directory with "
        "room for about the size of the items): File too large"
    )
    if source == "library":
        assert done.returncode == 3, done.stderr[-2000:]
        assert done.stdout == f"model.errors.UnavailableError: {said}\n"
    else:
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr == f"safety submit: {said}\n"
    assert redis_server.client().dbsize() == 0


def test_submit_refuses_out_or_timeout_without_wait_before_anything_is_sent(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--out and --timeout were silently ignored without --wait."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    assert main(["submit", str(src), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("safety submit: --out: needs --wait")
    assert main(["submit", str(src), "--timeout", "5"]) == 2  # as silently ignored
    assert capsys.readouterr().err.startswith("safety submit: --timeout: needs --wait")
    assert redis_server.client().dbsize() == 0


def test_an_item_that_is_not_an_object_is_named_without_a_field(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('"a bare string"\n')
    assert main(["submit", str(src)]) == 2  # refused before Redis is needed
    assert capsys.readouterr().err == f"safety submit: {src} line 1: items[0]: must be an object, got str\n"


@pytest.mark.parametrize(("flag", "value"), [("-c", "0"), ("-c", "-2"), ("--max-tasks-per-child", "0")])
def test_worker_counts_must_be_positive(flag: str, value: str, capsys: pytest.CaptureFixture) -> None:
    """-c -2 was Celery's click traceback, -c 0 silently meant 1."""
    parser = argparse.ArgumentParser(prog="safety")
    register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["worker", flag, value])
    assert e.value.code == 2
    assert f"must be a positive integer, got {value}" in capsys.readouterr().err


def test_json_and_job_id_output_into_a_closed_pipe_stop_quietly_with_141(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`safety job status J | head -c0` and `safety submit F | ...` (the job id on stdout) printed a
    BrokenPipeError traceback, exit 1; for `job delete` the job was gone all the same."""
    client = JobClient(WorkerSettings(redis_url=redis_server.url, queue="closed", chunk_size=10))
    client.submit([{"text": "one"}], job_id="known")
    client.store.dead_letter("known", 0, 3, "boom")
    client.close()
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "two"}\n')
    env = {**os.environ, "SAFETY_REDIS_URL": redis_server.url, "SAFETY_QUEUE": "closed"}
    commands = (
        ["job", "status", "known"],
        ["submit", str(src), "--job-id", "printed"],
        ["job", "dead-letters"],
    )
    for argv in commands:
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written
        proc = subprocess.run(
            [sys.executable, "-m", "worker.cli", *argv], env=env, stdout=write, stderr=subprocess.PIPE,
            text=True, timeout=60,
        )  # fmt: skip
        os.close(write)
        assert proc.returncode == 141, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_out_dev_stdout_redirected_to_a_file_appends_to_it(redis_server: RedisServer, tmp_path: Path) -> None:
    """`--out /dev/stdout >> all.jsonl`: /dev/stdout resolves to the file behind the descriptor, which was
    treated as a regular --out and replaced (its earlier lines lost, a new inode)."""
    client = JobClient(WorkerSettings(redis_url=redis_server.url, queue="devout", chunk_size=10))
    client.submit([{"text": f"item {i}"} for i in range(3)], job_id="devout")
    client.store.write("devout", [(i, json.dumps({"index": i}), False) for i in range(3)])
    client.close()
    target = tmp_path / "all.jsonl"
    target.write_text('{"earlier": true}\n')
    inode = target.stat().st_ino
    env = {**os.environ, "SAFETY_REDIS_URL": redis_server.url, "SAFETY_QUEUE": "devout"}
    with open(target, "a") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "worker.cli", "job", "results", "devout", "--out", "/dev/stdout"],
            env=env, stdout=out, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert lines == [{"earlier": True}] + [{"index": i} for i in range(3)]
    assert target.stat().st_ino == inode


@pytest.mark.parametrize("job_id", ["", "a b", ".hidden", "x" * 129])
def test_submit_refuses_a_job_id_it_cannot_use_by_its_flag_before_reading_the_items(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    job_id: str,
) -> None:
    """`--job-id ''` submitted under a random id, exit 0; a malformed id was refused as `job_id: ...` only
    after every item was read and checked."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setattr(JobClient, "_validate", lambda *_: pytest.fail("the items were read"))
    assert main(["submit", str(src), "--job-id", job_id]) == 2
    assert capsys.readouterr().err == (
        "safety submit: --job-id: must be 1-128 characters of A-Z a-z 0-9 . _ - (first a letter or digit), "
        f"got {job_id!r}; leave --job-id out to have one made\n"
    )
    assert redis_server.client().dbsize() == 0
    assert main(["job", "status", job_id]) == 2  # the job commands refuse it too, by their JOB_ID
    assert capsys.readouterr().err.startswith("safety job status: job_id: must be 1-128 characters")


def test_one_item_is_counted_in_the_singular(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """It said `submitted job one: 1 items, 1 chunk sent`."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "only"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "singular")
    assert main(["submit", str(src), "--job-id", "one"]) == 0
    assert capsys.readouterr() == ("one\n", "submitted job one: 1 item, 1 chunk sent\n")


def test_a_wait_that_times_out_says_how_to_carry_on(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`--wait --timeout` ended with `still queued after 0.3s` and nothing on how to get the results."""
    src, out = tmp_path / "in.jsonl", tmp_path / "r.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n')
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "nobody-listens")
    argv = ["submit", str(src), "--job-id", "slow", "--wait", "--timeout", "0.3", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith(
        "safety submit: job 'slow' is still queued after 0.3s (0/2 items); the job goes on: `safety job "
        f"status slow` shows its progress, `safety job results slow --out {out}` writes its results\n"
    )
    assert main(argv) == 2  # resumed, waited for again; the results would go to stdout
    assert capsys.readouterr().err.endswith("`safety job results slow` writes its results\n")
    assert main(["job", "results", "slow", "--timeout", "0.3"]) == 2
    assert capsys.readouterr().err == (
        "safety job results: job 'slow': result 0 not ready after 0.3s (job queued, 0/2 items); "
        "the job goes on: run `safety job results slow` again, with a longer --timeout or none\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
@pytest.mark.parametrize("command", ["submit", "job results"])
def test_a_timeout_that_is_not_a_positive_number_is_a_usage_error(
    command: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--timeout nan` waited for ever, `-1` ended with `still running after -1.0s`, `0` gave up at once."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n')
    argv = ["submit", str(src), "--wait"] if command == "submit" else ["job", "results", "j"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--timeout", value])
    assert e.value.code == 2
    assert (
        f"argument --timeout: expects a number of seconds above 0, got '{value}'" in capsys.readouterr().err
    )


def results_then_time_out(
    self: Any, job_id: str, *, start: int = 0, **options: Any
) -> Iterator[dict[str, Any]]:
    """JobClient.results that yields two lines from `start`, then runs out of its timeout."""
    from model.errors import DeadlineExceededError

    yield {"index": start, "id": str(start), "error": None}
    yield {"index": start + 1, "id": str(start + 1), "error": None}
    raise DeadlineExceededError(f"job {job_id!r}: result {start + 2} not ready after 1.0s")


def test_job_results_start_skips_the_items_before_it(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`--start N` writes the results of items N and on (a run that timed out on stdout carries on after the
    lines it wrote, instead of writing them all again); a negative N is a usage error naming the flag."""
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-start")  # no worker: the test writes the results
    client = JobClient(WorkerSettings(redis_url=redis_server.url, queue="cli-start"))
    try:
        client.submit([{"text": t} for t in ("a", "b", "c")], job_id="starts")
        lines = [(i, json.dumps({"index": i, "id": str(i), "error": None}), False) for i in range(3)]
        client.store.write("starts", lines)
    finally:
        client.close()
    for start, expected in ((0, [0, 1, 2]), (1, [1, 2]), (3, []), (9, [])):
        assert main(["job", "results", "starts", "--start", str(start), "--timeout", "30"]) == 0
        out = capsys.readouterr().out
        assert [json.loads(line)["index"] for line in out.splitlines()] == expected, start
    with pytest.raises(SystemExit) as e:
        main(["job", "results", "starts", "--start", "-1"])
    assert e.value.code == 2
    assert "argument --start: must be an item index (0 or more), got -1" in capsys.readouterr().err


def test_a_timeout_after_result_lines_went_to_stdout_says_how_many_and_where_to_carry_on(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """It said "`safety job results J` writes them" after some lines were printed: run again, it printed
    them again, and a consumer appending stdout got them twice."""
    monkeypatch.setenv("SAFETY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("SAFETY_QUEUE", "cli-partial")  # no worker
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    monkeypatch.setattr(JobClient, "results", results_then_time_out)
    monkeypatch.setattr(worker.cli, "_wait_with_progress", lambda client, status, *a: status)
    note = " (2 result lines already went to stdout before the timeout; carry on after them with --start 2)\n"
    argv = ["submit", str(src), "--job-id", "part", "--wait", "--timeout", "30", "--no-progress"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert err.endswith("`safety job results part` writes them" + note), err
    assert main(["job", "results", "part", "--timeout", "30"]) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert err.endswith("run `safety job results part` again, with a longer --timeout or none" + note), err
    # carrying on as it says: the two lines after those, and the note counts from there
    assert main(["job", "results", "part", "--start", "2", "--timeout", "30"]) == 2
    out, err = capsys.readouterr()
    assert [json.loads(line)["index"] for line in out.splitlines()] == [2, 3]
    assert err.endswith(
        "run `safety job results part --start 2` again, with a longer --timeout or none (2 result lines "
        "already went to stdout before the timeout; carry on after them with --start 4)\n"
    ), err
    # a file is written whole or not at all: nothing to say about it
    target = tmp_path / "r.jsonl"
    assert main(["job", "results", "part", "--out", str(target), "--timeout", "30"]) == 2
    assert capsys.readouterr().err.endswith(f"--out {target}` again, with a longer --timeout or none\n")
    assert not target.exists()
