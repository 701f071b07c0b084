"""`safety classify --remote` in process against real servers on port 0: any number of items, sent in
requests within the server's limits and printed as each request's results arrive; the client's API key
variable; what a failed call tells the CLI user."""

from __future__ import annotations

import itertools
import json
import re
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from model.cli import main
from service.client import ITEM_TOKENS, REQUEST_TOKENS, estimated_tokens, split_requests
from service.retries import BACKOFF_FIRST_S, JITTER, RETRIES, speaks_tls
from service.richstatus import RETRY_PUSHBACK
from service.scheduler import RETRY_DEFAULT_MS, RETRY_MAX_MS, RETRY_MIN_MS
from service.server import SafetyServer
from service.stubs import pb2, pb2_grpc
from tests.service.helpers import counted, free_port, in_queue, wait_until
from tests.service.helpers import request as one_request


def write_items(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"i{n}", "text": t}) + "\n" for n, t in enumerate(texts)))
    return path


def test_a_file_larger_than_max_items_is_sent_in_requests_the_server_accepts(
    start_server: Any, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """More than SAFETY_MAX_ITEMS items failed with INVALID_ARGUMENT and printed nothing; the local run
    classifies any number. Now the output is the local run's, from ceil(11 / 4) requests."""
    app = start_server(max_items=4)
    src = write_items(tmp_path / "in.jsonl", [f"item number {n}" for n in range(11)])
    argv = ["classify", "--jsonl", str(src), "--threshold", "hate=0.5"]
    assert main([*argv, "--remote", f"127.0.0.1:{app.port}"]) == 0
    remote = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert counted(app, "Classify") == {"OK": 3}
    assert main([*argv, "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in remote] == [f"i{n}" for n in range(11)]
    for got, want in zip(remote, local, strict=True):
        assert list(got) == list(want)  # the same keys, in the same order
        assert got["flagged_labels"] == want["flagged_labels"] and got["spans"] == want["spans"]
        assert got["scores"] == pytest.approx(want["scores"], rel=1e-4, abs=1e-5)


def test_results_print_as_each_request_returns_while_the_input_is_still_read(
    start_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The whole file was read, and every result waited for, before the first line was printed."""
    app = start_server(max_items=4)
    printed_when_read: list[int] = []
    out: list[str] = []

    class Stdin:  # a pipe that is still being written: lines come as they are asked for
        def __iter__(self) -> Iterator[str]:
            for n in range(10):
                out.extend(capsys.readouterr().out.splitlines())
                printed_when_read.append(len(out))
                yield json.dumps({"text": f"line {n}"}) + "\n"

    monkeypatch.setattr("sys.stdin", Stdin())
    assert main(["classify", "--remote", f"127.0.0.1:{app.port}", "--jsonl", "-"]) == 0
    out.extend(capsys.readouterr().out.splitlines())
    assert len(out) == 10
    # item 4 completed the first request's 4; it went out when item 5 was wanted, before line 6 was read
    assert printed_when_read == [0, 0, 0, 0, 0, 4, 4, 4, 4, 8]


def test_requests_stay_within_the_servers_message_bytes(start_server: Any, tmp_path: Path, capsys) -> None:
    app = start_server(max_message_bytes=700)
    texts = [("x" * 150 + f" {n}") for n in range(9)]
    src = write_items(tmp_path / "in.jsonl", texts)
    assert main(["classify", "--remote", f"127.0.0.1:{app.port}", "--jsonl", str(src)]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [
        f"i{n}" for n in range(9)
    ]
    assert counted(app, "Classify") == {"OK": 3}  # 4 of about 165 bytes fit in 700, 5 do not
    write_items(src, ["y" * 800, "fine"])  # no request can carry it: refused, naming it, exit 2
    assert main(["classify", "--remote", f"127.0.0.1:{app.port}", "--jsonl", str(src)]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err == (
        "safety classify: items[0]: is 810 bytes as a request message of its own, more than the server's "
        "limit of 700 (limits.max_message_bytes, SAFETY_MAX_MESSAGE_BYTES); shorten its text or context\n"
    )


def test_the_items_before_one_too_large_to_send_are_sent_and_printed_first(
    start_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Item 0 fills a request of 700 bytes, item 1 cannot go in one: exit 2 with nothing printed, item 0
    built but never sent. Now its result is printed, and the error says so."""
    app = start_server(max_message_bytes=700)
    src = write_items(tmp_path / "in.jsonl", ["a" * 690, "b" * 691, "never read"])
    assert pb2.ClassifyRequest(items=[pb2.Item(id="i0", text="a" * 690)]).ByteSize() == 700
    assert main(["classify", "--remote", f"127.0.0.1:{app.port}", "--jsonl", str(src)]) == 2
    said = capsys.readouterr()
    assert [json.loads(line)["id"] for line in said.out.splitlines()] == ["i0"]
    assert said.err == (
        "safety classify: items[1]: is 701 bytes as a request message of its own, more than the server's "
        "limit of 700 (limits.max_message_bytes, SAFETY_MAX_MESSAGE_BYTES); shorten its text or context; "
        "stopped there, after the results of the first 1 item\n"
    )
    assert counted(app, "Classify") == {"OK": 1}


def test_the_items_before_a_bad_line_are_sent_and_printed_first(
    start_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A bad line stopped the run with the items read before it, but not yet sent, never classified: 4 of
    the 5 good lines printed, and nothing said how many."""
    app = start_server(max_items=4)
    src = write_items(tmp_path / "in.jsonl", [f"line {n}" for n in range(5)])
    with src.open("a") as f:
        f.write('{"text": "no end\n')
    assert main(["classify", "--remote", f"127.0.0.1:{app.port}", "--jsonl", str(src)]) == 2
    said = capsys.readouterr()
    assert [json.loads(line)["id"] for line in said.out.splitlines()] == [f"i{n}" for n in range(5)]
    assert said.err.startswith(f"safety classify: {src}:6: not valid JSON (")
    assert said.err.endswith("); stopped there, after the results of the first 5 items\n")
    assert counted(app, "Classify") == {"OK": 2}


@pytest.mark.parametrize("max_bytes", [0, 300, 1000])
@pytest.mark.parametrize("max_items", [0, 1, 3])
def test_split_requests_fills_each_request_up_to_the_limits(max_items: int, max_bytes: int) -> None:
    items = [{"id": f"i{n}", "text": "t" * (n * 17 % 120 + 1), "role": "response", "context": "c" * n}
             for n in range(40)]  # fmt: skip
    thresholds = {"hate": 0.25}
    limits = {"max_items": max_items, "max_message_bytes": max_bytes, "max_queue_items": 4096}
    requests = list(split_requests(iter(items), limits, thresholds))
    assert [item.id for _, r in requests for item in r.items] == [f"i{n}" for n in range(40)]
    sizes = [len(r.items) for _, r in requests]
    assert [first for first, _ in requests] == [0, *itertools.accumulate(sizes)][:-1]
    for n, (_, request) in enumerate(requests):
        assert dict(request.thresholds) == thresholds
        assert not max_items or len(request.items) <= max_items
        assert not max_bytes or request.ByteSize() <= max_bytes
        if n + 1 < len(requests):  # full: one more item would have broken a limit
            more = pb2.ClassifyRequest()
            more.CopyFrom(request)
            more.items.append(requests[n + 1][1].items[0])
            assert (max_items and len(more.items) > max_items) or (max_bytes and more.ByteSize() > max_bytes)


def test_split_requests_bounds_the_estimated_tokens_of_each_request() -> None:
    """The requests were sized by items and bytes only: 15 texts of 199,980 characters went in one request
    of 3 MB, refused as more tokens than the server's whole queue. Now a request holds at most half the
    queue bound, and REQUEST_TOKENS, of estimated tokens (a token a character, plus ITEM_TOKENS): always
    at least one item."""
    assert REQUEST_TOKENS == 65_536  # a CPU server (about 5k tokens/s) answers one in seconds
    sizes = [len(r.items) for _, r in split_requests(["t" * 300] * 5, {"max_queue_tokens": 1000})]
    assert sizes == [1] * 5  # 316 estimated tokens each, 500 a request
    sizes = [len(r.items) for _, r in split_requests(["t" * 100] * 9, {"max_queue_tokens": 1000})]
    assert sizes == [4, 4, 1]  # 116 each: 4 are 464
    item = {"text": "t" * 15_000, "role": "response", "context": "c" * 5_000}
    limits = {"max_items": 256, "max_message_bytes": 64 << 20, "max_queue_tokens": 1_223_936}
    sizes = [len(r.items) for _, r in split_requests([item] * 7, limits)]
    assert sizes == [3, 3, 1]  # 20,016 each: REQUEST_TOKENS, not half the queue, bounds them
    sizes = [len(r.items) for _, r in split_requests(["x" * 199_980] * 3, limits)]
    assert sizes == [1, 1, 1]  # more than REQUEST_TOKENS alone: in a request of its own
    assert estimated_tokens(pb2.Item(text="abc", context="de")) == 5 + ITEM_TOKENS


def test_a_file_over_the_servers_queue_token_bound_is_sent_in_requests_it_accepts(
    start_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Each item within max_text_chars, all together more tokens than the whole queue: INVALID_ARGUMENT
    (`items: the request has more than ... tokens`), exit 1, nothing printed. Now every result, from
    requests of two items (about 1,000 tokens each, the queue holds 6,000)."""
    app = start_server(max_text_chars=1000, max_queue_tokens=6000)
    src = write_items(tmp_path / "in.jsonl", ["x" * 1000] * 15)
    assert main(["classify", "--remote", f"127.0.0.1:{app.port}", "--jsonl", str(src)]) == 0
    said = capsys.readouterr()
    assert [json.loads(line)["id"] for line in said.out.splitlines()] == [f"i{n}" for n in range(15)]
    assert said.err == ""
    assert counted(app, "Classify") == {"OK": 8}


@pytest.mark.parametrize("details", [True, False], ids=["details", "message-only"])
def test_a_request_the_server_finds_larger_than_its_queue_goes_again_in_halves(
    details: bool,
    start_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """The estimate is a token a character; a script the tokenizer was not trained on makes about three
    (bytes): two such items of 1,000 characters are more than the queue's 6,000 tokens, though estimated at
    half of it. The server refuses the request as a whole (field `items`), and each half passes. Without
    the error's details (no googleapis-common-protos on either end), its message names the field."""
    if not details:
        monkeypatch.setattr("service.client.error_details", lambda error: None)
    app = start_server(max_text_chars=1000, max_queue_tokens=6000)
    src = write_items(tmp_path / "in.jsonl", ["中" * 1000] * 6)
    assert main(["classify", "--remote", f"127.0.0.1:{app.port}", "--jsonl", str(src)]) == 0
    said = capsys.readouterr()
    assert [json.loads(line)["id"] for line in said.out.splitlines()] == [f"i{n}" for n in range(6)]
    assert said.err == ""
    assert counted(app, "Classify") == {"INVALID_ARGUMENT": 3, "OK": 6}


def test_split_requests_keeps_each_request_within_the_whole_queue_bound() -> None:
    """A request with more items than SAFETY_MAX_QUEUE_ITEMS is refused whatever SAFETY_MAX_ITEMS says."""
    requests = split_requests(["a"] * 9, {"max_items": 256, "max_queue_items": 4})
    assert [(first, len(r.items)) for first, r in requests] == [(0, 4), (4, 4), (8, 1)]


def test_an_item_the_server_refuses_is_named_by_its_index_in_the_input(
    start_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """In the third request, the server's `items[1]` is the input's item 9."""
    app = start_server(max_items=4, max_text_chars=50)
    src = write_items(tmp_path / "in.jsonl", ["short"] * 9 + ["z" * 60, "short"])
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", f"127.0.0.1:{app.port}", "--jsonl", str(src)])
    assert e.value.code == (
        f"safety classify --remote 127.0.0.1:{app.port}: INVALID_ARGUMENT: items[9].text: has 60 characters, "
        "the limit is 50 (SAFETY_MAX_TEXT_CHARS); stopped there, after the results of the first 8 items"
    )
    assert len(capsys.readouterr().out.splitlines()) == 8


def fill_queue(app: SafetyServer, stub: Any) -> list[Any]:
    """Hold the runner and fill the queue to its item bound: the calls admitted, still waiting."""
    bound = app.scheduler.max_queue_items
    app.scheduler.hold_runner()
    admitted = [stub.Classify.future(one_request(f"queued {n}"), timeout=30) for n in range(bound)]
    wait_until(lambda: in_queue(app) == bound, what="queue full")
    return admitted


def test_a_request_refused_as_busy_goes_again_after_the_servers_hint(
    start_server: Any, stub_for: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """RESOURCE_EXHAUSTED (the queue is full; retry in 100 ms, says the server) ended the whole run."""
    app = start_server(max_queue_items=2)
    target = f"127.0.0.1:{app.port}"
    admitted = fill_queue(app, stub_for(app))
    pauses: list[float] = []

    def pause(seconds: float) -> None:  # the queue drains meanwhile
        pauses.append(seconds)
        app.scheduler.release_runner()
        for call in admitted:
            assert call.result(30).results

    monkeypatch.setattr("service.retries.pause", pause)
    try:
        assert main(["classify", "--remote", target, "one", "two"]) == 0
    finally:
        app.scheduler.release_runner()
    said = capsys.readouterr()
    assert len(said.out.splitlines()) == 2
    assert pauses == [RETRY_DEFAULT_MS / 1000]  # no batch had measured the device yet
    assert said.err.startswith(
        f"safety classify --remote {target}: the server is busy (RESOURCE_EXHAUSTED: queue full (2 items, "
    )
    assert said.err.endswith("; sending items[0..1] again in 0.10 s (retry 1 of 8)\n")
    assert said.err.count("\n") == 1
    assert counted(app, "Classify") == {"RESOURCE_EXHAUSTED": 1, "OK": 3}


def test_a_server_that_stays_busy_ends_the_run_after_a_bounded_number_of_retries(
    start_server: Any, stub_for: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """After the first request's results are printed, the queue fills and stays full: the second request
    is sent RETRIES more times, then the run stops, saying so and how many results it printed."""
    app = start_server(max_queue_items=2)
    target = f"127.0.0.1:{app.port}"
    stub = stub_for(app)
    admitted: list[Any] = []
    pauses: list[float] = []
    monkeypatch.setattr("service.retries.pause", pauses.append)

    class Stdin:
        def __iter__(self) -> Iterator[str]:
            for n in range(5):
                if n == 4:  # read once the first request, items 0 and 1, was answered
                    admitted.extend(fill_queue(app, stub))
                yield json.dumps({"text": f"line {n}"}) + "\n"

    monkeypatch.setattr("sys.stdin", Stdin())
    try:
        with pytest.raises(SystemExit) as e:
            main(["classify", "--remote", target, "--jsonl", "-"])
    finally:
        app.scheduler.release_runner()
    for call in admitted:
        assert call.result(30).results
    said = capsys.readouterr()
    assert len(said.out.splitlines()) == 2
    assert len(pauses) == RETRIES == 8 and said.err.count("\n") == RETRIES
    assert all(RETRY_MIN_MS <= 1000 * p <= RETRY_MAX_MS for p in pauses)  # the server's hints
    last = said.err.splitlines()[-1]
    assert last.endswith(f"; sending items[2..3] again in {pauses[-1]:.2f} s (retry 8 of 8)"), last
    message = str(e.value.code)
    assert message.startswith(f"safety classify --remote {target}: RESOURCE_EXHAUSTED: queue full (2 items")
    assert message.endswith(
        f"; retry with backoff; still refused after 8 retries over {sum(pauses):.1f} s: retry later, or use "
        "a batch job (safety submit); stopped there, after the results of the first 2 items"
    )
    assert counted(app, "Classify") == {"OK": 3, "RESOURCE_EXHAUSTED": 1 + RETRIES}


def test_a_resource_exhausted_without_a_retry_hint_is_not_retried(
    start_server: Any, stub_for: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Not `safety serve`'s queue (gRPC's own message size limit sends no hint): it ends the run at once."""
    app = start_server(max_queue_items=2)
    target = f"127.0.0.1:{app.port}"
    admitted = fill_queue(app, stub_for(app))
    monkeypatch.setattr("service.retries.retry_after_ms", lambda error: None)
    monkeypatch.setattr("service.retries.pause", lambda seconds: pytest.fail("waited to retry"))
    try:
        with pytest.raises(SystemExit) as e:
            main(["classify", "--remote", target, "one"])
    finally:
        app.scheduler.release_runner()
    for call in admitted:
        assert call.result(30).results
    assert str(e.value.code).startswith(f"safety classify --remote {target}: RESOURCE_EXHAUSTED: queue full")
    assert str(e.value.code).endswith("; retry with backoff")
    assert capsys.readouterr().err == ""


def test_the_api_key_comes_from_safety_client_api_key_and_a_refusal_says_what_to_pass(
    start_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Only --api-key worked (which `ps` shows); SAFETY_API_KEY, the server's list of keys, was ignored
    without a word: UNAUTHENTICATED with gRPC's metadata hint only."""
    app = start_server(api_key="secret1,secret2")
    target = f"127.0.0.1:{app.port}"
    monkeypatch.delenv("SAFETY_CLIENT_API_KEY", raising=False)
    monkeypatch.setenv("SAFETY_API_KEY", "secret1")
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", target, "hi"])
    assert e.value.code == (
        f"safety classify --remote {target}: UNAUTHENTICATED: missing or wrong API key; send metadata "
        "`authorization: Bearer <key>`; pass the server's API key in SAFETY_CLIENT_API_KEY (or --api-key "
        "KEY, which `ps` shows); SAFETY_API_KEY is the server's setting, the client reads "
        "SAFETY_CLIENT_API_KEY"
    )
    monkeypatch.setenv("SAFETY_CLIENT_API_KEY", " secret2\n")  # as $(cat keyfile) may leave it
    assert main(["classify", "--remote", target, "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"]
    monkeypatch.setenv("SAFETY_CLIENT_API_KEY", "old-key")
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", target, "hi"])
    assert str(e.value.code).endswith("; the key of SAFETY_CLIENT_API_KEY is not one the server accepts")
    assert main(["classify", "--remote", target, "--api-key", "secret1", "hi"]) == 0  # the flag wins
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", target, "--api-key", "nope", "hi"])
    assert str(e.value.code).endswith("; the key of --api-key is not one the server accepts")


class Captured:
    """What a command running in another thread printed so far (capsys, read as it comes)."""

    def __init__(self, capsys: pytest.CaptureFixture) -> None:
        self.capsys = capsys
        self.out = self.err = ""

    def read(self) -> Captured:
        said = self.capsys.readouterr()
        self.out, self.err = self.out + said.out, self.err + said.err
        return self


def in_thread(argv: list[str]) -> tuple[threading.Thread, list[Any]]:
    """`safety ARGV` in a thread; the list gets its exit status (SystemExit's code, for a failed run)."""
    code: list[Any] = []

    def run() -> None:
        try:
            code.append(main(argv))
        except SystemExit as e:
            code.append(e.code)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, code


RETRY_LINE = re.compile(
    r"safety classify --remote (\S+): the server is unavailable \(UNAVAILABLE: (.*)\); (.*) again in "
    r"(\d+\.\d\d) s \(retry (\d) of 8\)"
)


def retry_lines(err: str) -> list[re.Match[str]]:
    """The retry lines of stderr; any other line fails the test."""
    lines = err.splitlines()
    found = [RETRY_LINE.fullmatch(line) for line in lines]
    assert all(found), err
    return found  # type: ignore[return-value]


def test_a_run_started_before_the_server_is_up_waits_for_it(
    start_server: Any, capsys: pytest.CaptureFixture
) -> None:
    """UNAVAILABLE (nothing listens yet: connection refused) ended the run at once, though classifying is
    idempotent: Info goes again after a growing, jittered pause, and the run goes on once the server is up."""
    target = f"127.0.0.1:{free_port()}"
    said = Captured(capsys)
    thread, code = in_thread(["classify", "--remote", target, "one", "two"])
    try:
        wait_until(lambda: "(retry 1 of 8)" in said.read().err, what="the first retry")
        app = start_server(address=target)
    finally:
        thread.join(30)
    assert code == [0], said.read().err
    assert [set(json.loads(line)) >= {"scores"} for line in said.read().out.splitlines()] == [True, True]
    lines = retry_lines(said.err)
    assert 1 <= len(lines) < RETRIES, said.err
    for n, line in enumerate(lines):
        assert line[1] == target and line[3] == "asking for its limits (Info)" and int(line[5]) == n + 1
        assert line[2].startswith("failed to connect to all addresses") and "Connection refused" in line[2]
    backoff = [float(line[4]) for line in lines]
    assert BACKOFF_FIRST_S * (1 - JITTER) - 0.01 <= backoff[0] <= BACKOFF_FIRST_S * (1 + JITTER) + 0.01
    assert counted(app, "Classify") == {"OK": 1}


def test_a_server_that_drains_and_restarts_mid_run_is_waited_for(
    start_server: Any,
    stub_for: Any,
    loop_thread: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A rolling restart between two requests: the server drains (new calls: UNAVAILABLE, `server is
    draining`), stops (connection refused), and comes back on the same port. The request it turned away
    goes again until the new server answers it; the output is whole and in order."""
    old = start_server(max_items=2)
    target = f"127.0.0.1:{old.port}"
    answered, draining = threading.Event(), threading.Event()

    class Stdin:
        def __iter__(self) -> Iterator[str]:
            for n in range(5):
                if n == 4:  # read once the first request, items 0 and 1, was answered
                    answered.set()
                    assert draining.wait(30)
                yield json.dumps({"id": f"i{n}", "text": f"line {n}"}) + "\n"

    monkeypatch.setattr("sys.stdin", Stdin())
    said = Captured(capsys)
    thread, code = in_thread(["classify", "--remote", target, "--jsonl", "-"])
    try:
        assert answered.wait(30)
        old.scheduler.hold_runner()  # a call in flight keeps the drain draining
        held = stub_for(old).Classify.future(one_request("in flight"), timeout=30)
        wait_until(lambda: in_queue(old) == 1, what="the call in flight")
        drained = loop_thread.submit(old.drain(30))
        wait_until(lambda: old.servicer.draining, what="the drain")
        draining.set()
        wait_until(lambda: "server is draining" in said.read().err, what="a retry of the drain's refusal")
        old.scheduler.release_runner()
        assert held.result(30).results  # the drain finishes what it holds
        drained.result(30)
        seen = len(said.err.splitlines())
        wait_until(lambda: len(said.read().err.splitlines()) > seen, what="a retry of the stopped server")
        new = start_server(max_items=2, address=target)
    finally:
        old.scheduler.release_runner()
        draining.set()
        thread.join(60)
    assert code == [0], said.read().err
    assert [json.loads(line)["id"] for line in said.read().out.splitlines()] == [f"i{n}" for n in range(5)]
    lines = retry_lines(said.err)
    assert all(line[3] == "sending items[2..3]" for line in lines), said.err
    assert lines[0][2] == "server is draining; retry on another replica", said.err
    assert "Connection refused" in lines[-1][2], said.err
    assert counted(new, "Classify") == {"OK": 2}


def test_a_server_that_stays_away_ends_the_run_when_its_timeout_would_run_out(
    capsys: pytest.CaptureFixture,
) -> None:
    """Nothing listening: UNAVAILABLE is retried while --timeout allows, then the run stops naming what it
    retried, why it gave up, and gRPC's own words with a hint."""
    target = f"127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", target, "--timeout", "1", "hi"])
    said = str(e.value.code)
    assert said.startswith(
        f"safety classify --remote {target}: UNAVAILABLE: failed to connect to all addresses"
    )
    assert (
        "Connection refused" in said
        and f" (is `safety serve` running at {target}?); still unavailable" in said
    )
    assert re.search(
        r"; still unavailable after [12] retries over 0\.\d s, and a retry in \d\.\d\d s would come after "
        r"--timeout \(1 s\) ran out: retry later, or pass a longer --timeout$",
        said,
    ), said
    assert 1 <= len(retry_lines(capsys.readouterr().err)) <= 2


def test_a_server_that_stays_away_is_retried_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    target = f"127.0.0.1:{free_port()}"
    pauses: list[float] = []
    monkeypatch.setattr("service.retries.pause", pauses.append)
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", target, "hi"])
    assert len(pauses) == RETRIES and len(retry_lines(capsys.readouterr().err)) == RETRIES
    growing = [BACKOFF_FIRST_S * 2**n for n in range(RETRIES)]
    for paused, base in zip(pauses, growing, strict=True):
        assert min(base, 4.0) * (1 - JITTER) <= paused <= min(base, 4.0) * (1 + JITTER)
    assert str(e.value.code).endswith(
        f" (is `safety serve` running at {target}?); still unavailable after 8 retries over "
        f"{sum(pauses):.1f} s: retry later"
    )


def test_a_deadline_exceeded_is_not_retried(
    start_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The request ran out of --timeout: another try would too (and the server dropped its work)."""
    app = start_server()
    monkeypatch.setattr("service.retries.pause", lambda seconds: pytest.fail("waited to retry"))
    app.scheduler.hold_runner()
    try:
        with pytest.raises(SystemExit) as e:
            main(["classify", "--remote", f"127.0.0.1:{app.port}", "--timeout", "0.5", "hi"])
    finally:
        app.scheduler.release_runner()
    said = str(e.value.code)  # the server's own (`deadline passed while queued`) or gRPC's, first to end it
    assert said.startswith(f"safety classify --remote 127.0.0.1:{app.port}: DEADLINE_EXCEEDED: "), said
    assert "retr" not in said, said
    assert capsys.readouterr().err == ""


class Unavailable(pb2_grpc.SafetyClassifierServicer):
    """A stand-in server whose first Classify answers UNAVAILABLE with a retry hint of 300 ms (as
    `safety serve` sends with JOB_BUSY), and later ones one empty result per item."""

    def __init__(self) -> None:
        self.calls = 0

    def Info(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb2.InfoResponse()  # no limits

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.calls == 1:
            context.set_trailing_metadata(((RETRY_PUSHBACK, "300"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "busy elsewhere; retry in 300 ms")
        return pb2.ClassifyResponse(results=[pb2.Result(id=item.id) for item in request.items])


def classify_hi_against(servicer: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[float]]:
    """`safety classify --remote TARGET hi` against a stand-in `servicer` on port 0, which must succeed in
    the end; -> TARGET, and the pauses before its retries (not slept)."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb2_grpc.add_SafetyClassifierServicer_to_server(servicer, server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    pauses: list[float] = []
    monkeypatch.setattr("service.retries.pause", pauses.append)
    try:
        assert main(["classify", "--remote", target, "hi"]) == 0
    finally:
        server.stop(0)
    return target, pauses


def test_an_unavailable_with_a_retry_hint_goes_again_after_the_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The server's hint, not the backoff, says when (and it is not jittered)."""
    servicer = Unavailable()
    _, pauses = classify_hi_against(servicer, monkeypatch)
    assert pauses == [0.3] and servicer.calls == 2
    [line] = retry_lines(capsys.readouterr().err)
    assert (
        line[2] == "busy elsewhere; retry in 300 ms" and line[3] == "sending items[0]" and line[4] == "0.30"
    )


class Cancelled(Unavailable):
    """A stand-in server whose first Classify is cut with CANCELLED (as gRPC core cancels the calls a
    server draining, restarting or drowning in new calls does not take), and later ones answered."""

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.calls == 1:
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        return pb2.ClassifyResponse(results=[pb2.Result(id=item.id) for item in request.items])


def test_a_call_the_server_cancelled_goes_again_after_a_backoff(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A 600-item run ended with `CANCELLED: CANCELLED; stopped there, after the results of the first 140
    items` during a server's restart: the CLI never cancels its own calls, and Classify is idempotent."""
    servicer = Cancelled()
    target, pauses = classify_hi_against(servicer, monkeypatch)
    assert servicer.calls == 2 and len(pauses) == 1
    assert BACKOFF_FIRST_S * (1 - JITTER) <= pauses[0] <= BACKOFF_FIRST_S * (1 + JITTER)
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1
    assert err == (
        f"safety classify --remote {target}: the call was cancelled by the server (CANCELLED: CANCELLED); "
        f"sending items[0] again in {pauses[0]:.2f} s (retry 1 of 8)\n"
    )


@pytest.fixture
def accept_and_close() -> Iterator[str]:
    """HOST:PORT of a listener that accepts each connection and closes it at once (docker-proxy before the
    container listens, kubectl port-forward, an L4 load balancer with no backend)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_listener_that_accepts_and_closes_is_retried_not_taken_for_a_tls_port(
    accept_and_close: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """gRPC's `Socket closed` for a plaintext call was taken for a TLS port (given up at once, "does …
    serve TLS? then pass --tls"): the port does not answer a TLS handshake, so it is retried like any
    UNAVAILABLE."""
    target = accept_and_close
    assert speaks_tls(target) is False
    pauses: list[float] = []
    monkeypatch.setattr("service.retries.pause", pauses.append)
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", target, "hi"])
    said = str(e.value.code)
    assert len(pauses) == RETRIES, said
    lines = retry_lines(capsys.readouterr().err)
    assert len(lines) == RETRIES
    assert said.startswith(f"safety classify --remote {target}: UNAVAILABLE: failed to connect"), said
    assert "TLS" not in said and said.endswith(
        f"; still unavailable after 8 retries over {sum(pauses):.1f} s: retry later"
    )


def test_a_listener_that_accepts_and_closes_is_retried_within_the_timeout(
    accept_and_close: str, capsys: pytest.CaptureFixture
) -> None:
    target = accept_and_close
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", target, "--timeout", "2", "hi"])
    said = str(e.value.code)
    assert (
        "TLS" not in said and "a retry in" in said and "would come after --timeout (2 s) ran out" in said
    ), said
    assert len(retry_lines(capsys.readouterr().err)) >= 2


def test_speaks_tls_cannot_probe_what_is_not_host_and_port() -> None:
    assert speaks_tls("unix:/tmp/safety.sock") is None and speaks_tls("dns:///localhost:50051") is None
    assert speaks_tls(f"127.0.0.1:{free_port()}") is False  # refused


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_a_timeout_that_is_not_a_positive_number_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture
) -> None:
    """`--timeout nan` waited for ever (no deadline), `-1` and `0` failed every call at once."""
    with pytest.raises(SystemExit) as e:
        main(["classify", "--remote", "127.0.0.1:1", "--timeout", value, "hi"])
    assert e.value.code == 2
    assert (
        f"argument --timeout: expects a number of seconds above 0, got '{value}'" in capsys.readouterr().err
    )
