"""Every error the API promises: its status code and a message naming the offending field."""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
import pytest

from service.errors import STATUS_CODES, status_for
from service.stubs import pb2
from tests.service.helpers import ExplodingLaunch, in_queue, request, wait_until

MAX_ITEMS, MAX_CHARS = 4, 1000
INVALID = grpc.StatusCode.INVALID_ARGUMENT
RESPONSE = pb2.ROLE_RESPONSE


@pytest.fixture(scope="module")
def limited(start_server: Any) -> Any:
    return start_server(max_items=MAX_ITEMS, max_text_chars=MAX_CHARS)


@pytest.fixture
def limited_stub(limited: Any, stub_for: Any) -> Any:
    return stub_for(limited)


def call_error(stub: Any, req: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(req, timeout=10)
    return err.value


@pytest.mark.parametrize(
    ("req", "where", "words"),
    [
        (pb2.ClassifyRequest(), "items", "at least one item"),
        (request(*["x"] * (MAX_ITEMS + 1)), "items", f"limit of {MAX_ITEMS} per request (SAFETY_MAX_ITEMS)"),
        (request("ok", ""), "items[1].text", "must not be empty"),
        (request("ok", "  \u200b \n"), "items[1].text", "must not be blank: only whitespace"),
        (request("ok", "ok", "y" * (MAX_CHARS + 1)), "items[2].text", f"the limit is {MAX_CHARS}"),
        (
            pb2.ClassifyRequest(items=[pb2.Item(text="a", role=RESPONSE, context="c" * (MAX_CHARS + 1))]),
            "items[0].context",
            f"the limit is {MAX_CHARS}",
        ),
        (
            pb2.ClassifyRequest(items=[pb2.Item(text="ok"), pb2.Item(text="hi", context="the prompt")]),
            "items[1].context",
            "only allowed on role 'response'",
        ),
        (
            pb2.ClassifyRequest(items=[pb2.Item(text="hi", role=pb2.ROLE_PROMPT, context="the prompt")]),
            "items[0].context",
            "only allowed",
        ),
        (pb2.ClassifyRequest(items=[pb2.Item(text="hi", role=7)]), "items[0].role", "unknown role 7"),
        (request("ok", thresholds={"toxicity": 0.5}), "thresholds.toxicity", "unknown label"),
        (request("ok", thresholds={"hate": 1.5}), "thresholds.hate", "[0, 1]"),
        (request("ok", thresholds={"hate": -0.01}), "thresholds.hate", "[0, 1]"),
        (request("ok", thresholds={"hate": float("nan")}), "thresholds.hate", "[0, 1]"),
    ],
    ids=[
        "no-items", "too-many-items", "empty-text", "blank-text", "text-too-long", "context-too-long",
        "context-on-unspecified-role", "context-on-prompt", "unknown-role", "unknown-label",
        "threshold-above-1", "threshold-below-0", "threshold-nan",
    ],
)  # fmt: skip
def test_invalid_argument_names_field(limited_stub: Any, req: Any, where: str, words: str) -> None:
    err = call_error(limited_stub, req)
    assert err.code() == INVALID
    assert err.details().startswith(f"{where}: "), err.details()
    assert words in err.details()


def test_valid_request_at_the_limits_passes(limited_stub: Any) -> None:
    response = limited_stub.Classify(
        request(*["z" * MAX_CHARS] * MAX_ITEMS, thresholds={"hate": 1.0}), timeout=30
    )
    assert len(response.results) == MAX_ITEMS


SMALL_BOUND, SMALL_CHARS = 2048, 1000  # one item of 1,000 characters can make more than 2,048 tokens


@pytest.fixture(scope="module")
def small_token_bound(start_server: Any) -> Any:
    return start_server(max_queue_tokens=SMALL_BOUND, max_text_chars=SMALL_CHARS)


def test_request_larger_than_one_call_may_queue_is_invalid(
    small_token_bound: Any, stub_for: Any, tiny_classifier: Any
) -> None:
    """One call may queue up to the larger of the queue bound and the most tokens one item within
    max_text_chars can make; a request of several items past that is refused as a whole, naming both."""
    from model import Item

    text = "a b c d e f g h " * 60  # 960 characters
    (enc,) = tiny_classifier.encode([Item(text=text)])
    tokens, most = sum(len(w) for w in enc.windows), tiny_classifier.most_tokens(SMALL_CHARS)
    assert tokens < SMALL_BOUND < most
    err = call_error(stub_for(small_token_bound), request(*[text] * (most // tokens + 1)))
    assert err.code() == INVALID
    assert err.details().startswith("items: the request has more than "), err.details()
    assert (
        f"more than the {most} tokens one call may queue (the most one item of SAFETY_MAX_TEXT_CHARS="
        f"{SMALL_CHARS} characters can make; the server's whole queue bound of {SMALL_BOUND} "
        "(SAFETY_MAX_QUEUE_TOKENS))" in err.details()
    ), err.details()


def test_request_with_more_items_than_the_queue_holds_is_invalid(start_server: Any, stub_for: Any) -> None:
    app = start_server(max_queue_items=2)
    err = call_error(stub_for(app), request("a", "b", "c"))
    assert err.code() == INVALID
    assert (
        err.details().startswith("items: 3 items")
        and "queue bound of 2 (SAFETY_MAX_QUEUE_ITEMS)" in err.details()
    )


def test_unexpected_exception_is_internal_with_logged_error_id(
    start_server: Any, stub_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = start_server()

    app.scheduler.clf = ExplodingLaunch(app.scheduler.clf)
    with caplog.at_level(logging.ERROR, logger="safety.service"):
        err = call_error(stub_for(app), request("hello"))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "kernel exploded" not in err.details()  # no internals leak to the caller
    match = re.search(r"error id ([0-9a-f]{16})", err.details())
    assert match, err.details()
    logged = [r for r in caplog.records if getattr(r, "error_id", None) == match.group(1)]
    assert logged and logged[0].exc_info and "kernel exploded" in str(logged[0].exc_info[1])


def test_unavailable_while_loading(loop_thread: Any, stub_for: Any, tiny_classifier: Any) -> None:
    from service.server import create_server
    from service.settings import ServeSettings

    app = loop_thread.run(create_server(ServeSettings(address="127.0.0.1:0", metrics_address=None)))
    loop_thread.run(app.server.start())  # serving, but no model attached yet
    try:
        err = call_error(stub_for(app), request("hello"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
    finally:
        loop_thread.run(app.drain(0))


def test_one_table_maps_the_hierarchy() -> None:
    from model import errors

    assert status_for(errors.InvalidInputError("x", field="f")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(errors.OverloadedError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(errors.UnavailableError("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_for(errors.DeadlineExceededError("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_for(errors.UnauthenticatedError("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_for(errors.ModelNotFoundError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(ValueError("x")) == grpc.StatusCode.INTERNAL
    # every deliberate error class has a code
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.SafetyError) and cls is not errors.SafetyError:
            assert any(issubclass(cls, c) for c, _ in STATUS_CODES), cls


def test_a_message_over_the_size_limit_is_invalid_argument_naming_the_limit_and_counted(
    start_server: Any, stub_for: Any
) -> None:
    """Not grpc's RESOURCE_EXHAUSTED (our API's "back off and retry"), which would also end a whole stream and
    reach the metrics as CANCELLED; grpc's own limit stays at twice ours, as the memory guard."""
    app = start_server(max_message_bytes=1024)
    big = request("x" * 2000)
    size = big.ByteSize()
    err = call_error(stub_for(app), big)
    assert err.code() == INVALID
    assert err.details() == (
        f"request: the Classify request message has {size:,} bytes, more than the limit of 1,024 "
        "(SAFETY_MAX_MESSAGE_BYTES); send them in several requests"
    )
    labels = {"method": "Classify", "code": "INVALID_ARGUMENT"}
    registry = app.metrics.registry
    wait_until(lambda: registry.get_sample_value("safety_requests_total", labels) == 1, what="the count")
    # in a stream, that request's error; the stream goes on
    requests = [request("fine"), big, request("fine too")]
    replies = list(stub_for(app).ClassifyStream(iter(requests), timeout=10))
    assert [r.WhichOneof("outcome") for r in replies] == ["response", "error", "response"]
    assert replies[1].error.status == "INVALID_ARGUMENT"
    assert "ClassifyStream request message has" in replies[1].error.message
    # beyond twice the limit, grpc's own guard (never parsed, never held past its limit)
    assert call_error(stub_for(app), request("x" * 3000)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_oversized_message_is_never_parsed_and_its_error_says_how_to_split_it() -> None:
    from service.decoding import Oversized, check_decoded, grpc_receive_limit, tolerant

    def parse(data: bytes) -> Any:
        raise AssertionError("an oversized message must not be parsed")

    oversized = tolerant(parse, "SubmitJob", 4)(b"12345")
    assert oversized == Oversized("SubmitJob", 5, 4)
    with pytest.raises(Exception, match="split its items over several jobs") as err:
        check_decoded(oversized)
    assert getattr(err.value, "field", None) == "request"
    assert tolerant(lambda data: data, "Classify", 4)(b"1234") == b"1234"  # at the limit: parsed
    assert grpc_receive_limit(64 << 20) == 128 << 20 and grpc_receive_limit(2**31) == 2**31 - 1


def test_a_cancellation_at_the_deadline_counts_as_the_deadline_the_client_saw() -> None:
    """The client's deadline fires first and cancels: the server sees it a network trip early."""
    from service.deadlines import DEADLINE_SLACK_S, deadline_passed

    assert not deadline_passed(None, 1e9)
    assert deadline_passed(10.0, 10.0) and deadline_passed(10.0, 10.0 - DEADLINE_SLACK_S / 2)
    assert not deadline_passed(10.0, 10.0 - 2 * DEADLINE_SLACK_S)


def test_a_request_that_does_not_parse_is_invalid_argument_and_counted(start_server: Any) -> None:
    """proto3 strings must be UTF-8; grpc alone would answer UNKNOWN before any handler or metric saw it."""
    app = start_server()
    text = b"\xff\xfeinvalid utf-8"
    item = b"\x12" + bytes([len(text)]) + text  # Item.text = 2
    raw = b"\x0a" + bytes([len(item)]) + item  # ClassifyRequest.items = 1
    good = pb2.ClassifyRequest(items=[pb2.Item(text="fine")]).SerializeToString()
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/safety.v1.SafetyClassifier/Classify", **identity)(raw, timeout=10)
        assert err.value.code() == INVALID
        assert err.value.details().startswith("request: not a valid Classify request message (")
        stream = channel.stream_stream("/safety.v1.SafetyClassifier/ClassifyStream", **identity)
        replies = stream(iter([good, raw, good]), timeout=10)
        answers = [pb2.ClassifyStreamResponse.FromString(m) for m in replies]
    assert [a.WhichOneof("outcome") for a in answers] == ["response", "error", "response"]
    error = answers[1].error
    assert error.status == "INVALID_ARGUMENT" and "ClassifyStream request" in error.message
    counted = app.metrics.registry.get_sample_value(
        "safety_requests_total", {"method": "Classify", "code": "INVALID_ARGUMENT"}
    )
    assert counted == 1


EMOJI_CHARS = 10_000


@pytest.fixture(scope="module")
def emoji_server(start_server: Any, tiny_model_dir: Any) -> Any:
    """The default token bound, 32 x 1,024, below what one text of 10,000 emoji makes (4 tokens each)."""
    from model import load_classifier

    clf = load_classifier(tiny_model_dir, device="cpu", max_batch_tokens=1024)
    return start_server(classifier=clf, max_text_chars=EMOJI_CHARS)


def test_any_text_within_max_text_chars_fits_the_default_token_bound(
    emoji_server: Any, stub_for: Any
) -> None:
    """The docs promise texts up to limits.max_text_chars, and the default queue bound (32 x
    max_batch_tokens) is smaller than what such a text of emoji (4 tokens a character) makes. The bound stays
    32 x max_batch_tokens (raising it to that worst case weakened admission about 4 times on the CPU); one
    call may queue up to the worst case instead."""
    clf = emoji_server.classifier
    bound = stub_for(emoji_server).Info(pb2.InfoRequest(), timeout=10).limits.max_queue_tokens
    assert bound == 32 * 1024 == emoji_server.scheduler.max_queue_tokens
    assert emoji_server.scheduler.max_call_tokens == clf.most_tokens(EMOJI_CHARS) > bound
    response = stub_for(emoji_server).Classify(request("\U0001f600" * EMOJI_CHARS), timeout=60)
    assert response.results[0].windows > 32


def test_an_item_larger_than_the_bound_joins_a_queue_below_it_and_later_calls_are_refused(
    emoji_server: Any, stub_for: Any
) -> None:
    """A maximal item is queued while the queue is below its bound (here it already holds a call), takes the
    queue over the bound, and every later call gets RESOURCE_EXHAUSTED until the device has worked it off."""
    app, stub = emoji_server, stub_for(emoji_server)
    bound = app.scheduler.max_queue_tokens
    assert bound == 32 * 1024  # the default, below what the item makes
    app.scheduler.hold_runner()
    try:
        first = stub.Classify.future(request("queued first"), timeout=60)
        wait_until(lambda: in_queue(app) == 1, what="first call queued")
        worst = "\U0001f600" * EMOJI_CHARS  # as a response and its context: the most an item can make
        maximal = pb2.ClassifyRequest(items=[pb2.Item(text=worst, role=RESPONSE, context=worst)])
        huge = stub.Classify.future(maximal, timeout=60)
        wait_until(lambda: in_queue(app) == 2, what="the maximal item queued")
        assert app.scheduler.stats()["queued_tokens"] > app.scheduler.max_call_tokens > bound
        for later in (request("a later call"), maximal):
            err = call_error(stub, later)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.details()
    finally:
        app.scheduler.release_runner()
    assert len(first.result(60).results) == 1
    assert huge.result(60).results[0].windows > 32
    wait_until(lambda: app.scheduler.stats()["queued_tokens"] == 0, what="the queue drained")
    assert len(stub.Classify(request("after it"), timeout=60).results) == 1
