"""Requests that do not parse: INVALID_ARGUMENT naming the message, instead of grpc's UNKNOWN.

Owns: `DecodeInterceptor`, which gives our own services' handlers a request deserializer that never raises
(a message that does not parse, such as a string field that is not UTF-8, as proto3 requires, becomes an
`Undecodable`), and `check_decoded(request)`, which turns one into `InvalidInputError(field="request")`.
Unary requests are checked before the handler runs; a ClassifyStream checks each request it reads, so one bad
message is that request's StreamError and the stream goes on. Without this, grpc fails the call with UNKNOWN
before any handler or interceptor sees it, and the call is missing from the metrics. Must not know: what the
handlers do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from model.errors import InvalidInputError
from service.handlers import WrappingInterceptor, with_behavior


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not parse."""

    method: str  # "Classify", ...
    reason: str

    def error(self) -> InvalidInputError:
        return InvalidInputError(
            f"not a valid {self.method} request message ({self.reason}); its strings must be UTF-8",
            field="request",
        )


def check_decoded(request: Any) -> Any:
    """`request`, or InvalidInputError when it did not parse."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


def tolerant(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as e:
            return Undecodable(method, str(e) or type(e).__name__)

    return parse


class DecodeInterceptor(WrappingInterceptor):
    """Our services' (`prefix`) handlers with a tolerant request deserializer; unary requests checked."""

    def __init__(self, prefix: str = "/safety.") -> None:
        super().__init__()
        self.prefix = prefix

    def applies(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> bool:
        return handler.request_deserializer is not None and details.method.startswith(self.prefix)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior: Callable[..., Any]
        if handler.unary_unary is not None:
            behavior = _checked_unary(handler.unary_unary)
        elif handler.unary_stream is not None:
            behavior = _checked_stream(handler.unary_stream)
        else:  # a stream of requests checks each one as it reads it (servicer.ClassifyStream)
            behavior = handler.stream_stream or handler.stream_unary
        return with_behavior(handler, behavior, tolerant(handler.request_deserializer, method))


def _checked_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(check_decoded(request), context)

    return checked


def _checked_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for message in behavior(check_decoded(request), context):
            yield message

    return checked


__all__ = ["DecodeInterceptor", "Undecodable", "check_decoded"]
