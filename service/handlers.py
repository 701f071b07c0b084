"""Rebuilding a gRPC method handler around a new behaviour: the one piece the server's interceptors share.

Owns: `kind(handler)` (which of the four call shapes a handler has) and `with_behavior(handler, behavior)`, a
handler of the same kind with the same (de)serializers (or another request deserializer) and `behavior` in
place of the original's. Must not
know: what the interceptors do (errors, metrics, auth).
"""

from __future__ import annotations

from collections.abc import Callable
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
