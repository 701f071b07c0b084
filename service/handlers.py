"""Rebuilding a gRPC method handler around a new behaviour: the one piece the server's interceptors share.

Owns: `kind(handler)` (which of the four call shapes a handler has) and `with_behavior(handler, behavior)`, a
handler of the same kind with the same (de)serializers (or another request deserializer) and `behavior` in
place of the original's; `reading_its_request(handler, behavior)`, the same for a handler of one request but
of the request-stream kind, so that grpc runs `behavior` before the request has arrived (a handler that
takes a request stream already keeps its kind); `Memo`, which builds an interceptor's wrapper once per
method instead of once per call; and `WrappingInterceptor`, the base of every interceptor of ours. Must not
know: what the interceptors do (errors, metrics, auth, decoding).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def kind(handler: grpc.RpcMethodHandler) -> str:
    """ "unary_unary", "unary_stream", "stream_unary" or "stream_stream": the behaviour the handler has."""
    return next(name for name in FACTORIES if getattr(handler, name) is not None)


def with_behavior(
    handler: grpc.RpcMethodHandler,
    behavior: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and (de)serializers that runs `behavior` (and parses requests with
    `request_deserializer`, when given)."""
    return FACTORIES[kind(handler)](
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# A handler of one request as the handler of a request stream with the same responses.
STREAMED_REQUEST = {"unary_unary": "stream_unary", "unary_stream": "stream_stream"}


def reading_its_request(
    handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler:
    """A handler with `handler`'s (de)serializers, of the kind that takes a request stream ("unary_unary" ->
    "stream_unary", "unary_stream" -> "stream_stream"; one that takes a request stream keeps its kind), that
    runs `behavior(requests, context)`. For a handler of one request, grpc.aio first awaits the request
    message (receiving and parsing all of it), and runs no handler at all when the call is cancelled or its
    deadline passes meanwhile; for a request stream it runs the handler at once, which then reads the
    request itself (`context.read()`), or never does. On the wire both are the same call."""
    shape = kind(handler)
    return FACTORIES[STREAMED_REQUEST.get(shape, shape)](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


MEMO_SIZE = 256  # wrapped handlers kept per interceptor: our methods, with room; never grows past it


class Memo:
    """The handler an interceptor built around each (method, handler) it was given. grpc hands an
    interceptor the same handler object on every call of a method, so the wrapping (closures and a new
    RpcMethodHandler, ~5-10 us) is done once per method, not per call. Bounded: a handler that is new on
    every call is wrapped every time and not kept."""

    def __init__(self) -> None:
        self._built: dict[tuple[str, int], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self, method: str, handler: grpc.RpcMethodHandler, build: Callable[[], grpc.RpcMethodHandler]
    ) -> grpc.RpcMethodHandler:
        key = (method, id(handler))
        hit = self._built.get(key)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = build()
        if len(self._built) < MEMO_SIZE:
            self._built[key] = (handler, wrapped)  # holding `handler` keeps its id from being reused
        return wrapped


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """The shape every interceptor of ours has: the handler of a call it `applies` to, wrapped by `wrap`
    (once per method, through a Memo); any other call's handler as it is."""

    def __init__(self) -> None:
        self._memo = Memo()

    def applies(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> bool:
        return True

    def handler_for(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """The handler this call runs with, given the next one's: `handler` wrapped by `wrap` (memoized) if
        this interceptor `applies`, else `handler` itself. An interceptor that picks among several wrappers
        overrides this (each with a Memo of its own: one Memo keeps one wrapper per method)."""
        if not self.applies(handler, details):
            return handler
        full = details.method
        return self._memo.get(full, handler, lambda: self.wrap(handler, full.rsplit("/", 1)[-1]))

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """`handler` around a new behaviour; `method` is the bare method name ("Classify")."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return None if handler is None else self.handler_for(handler, handler_call_details)
