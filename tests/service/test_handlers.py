"""service.handlers.Memo: an interceptor's wrapper is built once per method, and never kept without bound."""

from __future__ import annotations

from typing import Any

import grpc

from service.handlers import MEMO_SIZE, Memo, with_behavior


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
