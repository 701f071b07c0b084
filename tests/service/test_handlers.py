"""A rebuilt handler keeps its kind and (de)serializers and runs the new behaviour (or, rebuilt to read its
own request, takes a request stream); an interceptor's wrapper is built once per method (Memo), and never
kept without bound."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from service.handlers import FACTORIES, MEMO_SIZE, Memo, kind, reading_its_request, with_behavior


def _ser(x: bytes) -> bytes:
    return x


def _de(x: bytes) -> bytes:
    return x


@pytest.mark.parametrize("name", list(FACTORIES))
def test_with_behavior_keeps_kind_and_serializers(name: str) -> None:
    def old(*args: object) -> None:
        return None

    def new(*args: object) -> None:
        return None

    handler = FACTORIES[name](old, request_deserializer=_de, response_serializer=_ser)
    assert kind(handler) == name
    rebuilt = with_behavior(handler, new)
    assert kind(rebuilt) == name and getattr(rebuilt, name) is new
    assert rebuilt.request_deserializer is _de and rebuilt.response_serializer is _ser
    assert isinstance(rebuilt, grpc.RpcMethodHandler)


def test_with_behavior_can_swap_the_request_deserializer() -> None:
    handler = FACTORIES["unary_unary"](_ser, request_deserializer=_de, response_serializer=_ser)
    rebuilt = with_behavior(handler, _ser, request_deserializer=_ser)
    assert rebuilt.request_deserializer is _ser and rebuilt.response_serializer is _ser


@pytest.mark.parametrize(
    ("name", "streamed"), [("unary_unary", "stream_unary"), ("unary_stream", "stream_stream")]
)
def test_a_handler_of_one_request_becomes_one_of_a_request_stream(name: str, streamed: str) -> None:
    """The same responses and (de)serializers: grpc then runs the behaviour before reading the request."""

    def new(*args: object) -> None:
        return None

    handler = FACTORIES[name](_ser, request_deserializer=_de, response_serializer=_ser)
    rebuilt = reading_its_request(handler, new)
    assert kind(rebuilt) == streamed and getattr(rebuilt, streamed) is new
    assert rebuilt.request_streaming and rebuilt.response_streaming == (streamed == "stream_stream")
    assert rebuilt.request_deserializer is _de and rebuilt.response_serializer is _ser


async def behavior(request: Any, context: Any) -> Any:
    return request


def handler() -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behavior)


def test_the_same_handler_is_wrapped_once_per_method() -> None:
    memo, built = Memo(), []

    def build(h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        built.append(h)
        return with_behavior(h, behavior)

    h = handler()
    first = memo.get("/s/A", h, lambda: build(h))
    assert all(memo.get("/s/A", h, lambda: build(h)) is first for _ in range(10))
    assert memo.get("/s/B", h, lambda: build(h)) is not first  # another method, its own wrapper
    assert len(built) == 2


def test_a_handler_new_on_every_call_is_wrapped_every_time_and_the_memo_stays_bounded() -> None:
    memo = Memo()
    kept = [handler() for _ in range(MEMO_SIZE + 50)]  # alive, so no id is reused
    wrapped = [memo.get("/s/A", h, lambda h=h: with_behavior(h, behavior)) for h in kept]
    assert len({id(w) for w in wrapped}) == len(kept)
    assert len(memo._built) == MEMO_SIZE
