"""Every error the API promises: its status code and a message naming the offending field."""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
import pytest

from service.errors import STATUS_CODES, status_for
from service.stubs import pb2
from tests.service.helpers import ExplodingLaunch, request, wait_until

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


@pytest.fixture(scope="module")
def small_token_bound(start_server: Any) -> Any:
    return start_server(max_queue_tokens=2048)


def test_request_larger_than_the_whole_queue_is_invalid(
    small_token_bound: Any, stub_for: Any, tiny_classifier: Any
) -> None:
    from model import Item

    text = "a b c d e f g h " * 100
    (enc,) = tiny_classifier.encode([Item(text=text)])
    tokens = sum(len(w) for w in enc.windows)
    assert tokens < 2048
    err = call_error(stub_for(small_token_bound), request(*[text] * (2048 // tokens + 1)))
    assert err.code() == INVALID
    assert (
        err.details().startswith("items: the request has more than ")
        and "queue bound of 2048 (SAFETY_MAX_QUEUE_TOKENS)" in err.details()
    )


def test_a_text_larger_than_the_whole_queue_is_invalid_naming_it_and_its_tokens(
    small_token_bound: Any, stub_for: Any, tiny_classifier: Any
) -> None:
    """The item that alone passes the bound is named, with the tokens it made (the request as a whole was,
    and neither the item nor its count could be told from the message)."""
    from model import Item

    text = "a b c d e f g h " * 600
    (enc,) = tiny_classifier.encode([Item(text=text)])
    tokens = sum(len(w) for w in enc.windows)
    err = call_error(stub_for(small_token_bound), request("short", text))
    assert err.code() == INVALID
    assert err.details().startswith(
        f"items[1].text: makes {tokens} tokens ({len(enc.windows)} windows), more than the server's whole "
        "queue bound of 2048 (SAFETY_MAX_QUEUE_TOKENS)"
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


def test_any_text_within_max_text_chars_fits_the_default_token_bound(
    start_server: Any, stub_for: Any, tiny_model_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The docs promise texts up to limits.max_text_chars; the default queue bound (32 x max_batch_tokens)
    was smaller than what such a text of emoji (4 tokens a character) makes, and refused it INVALID_ARGUMENT.
    The default is now at least that worst case. A bound set below it is kept, with a start-up warning."""
    from model import load_classifier

    clf = load_classifier(tiny_model_dir, device="cpu", max_batch_tokens=1024)  # 32 x 1024 = 32,768
    chars = 10_000
    app = start_server(classifier=clf, max_text_chars=chars)
    bound = stub_for(app).Info(pb2.InfoRequest(), timeout=10).limits.max_queue_tokens
    assert bound == clf.most_tokens(chars) > 32 * 1024
    response = stub_for(app).Classify(request("\U0001f600" * chars), timeout=60)
    assert response.results[0].windows > 32

    with caplog.at_level(logging.WARNING, logger="safety.service.scheduler"):
        start_server(classifier=clf, max_text_chars=chars, max_queue_tokens=32 * 1024)
    assert f"SAFETY_MAX_QUEUE_TOKENS 32768 is below the {bound} tokens" in caplog.text
