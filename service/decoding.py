"""Requests that do not parse or are too large: INVALID_ARGUMENT naming the message and the limit.

Owns: `DecodeInterceptor`, which gives our own services' handlers a request deserializer that never raises: a
message that does not parse (such as a string field that is not UTF-8, as proto3 requires) becomes an
`Undecodable`, and one over `max_message_bytes` (SAFETY_MAX_MESSAGE_BYTES) an `Oversized`, left unparsed;
`check_decoded(request)` turns either into `InvalidInputError(field="request")`. Unary requests are checked
before the handler runs; a ClassifyStream checks each request it reads, so one bad message is that request's
StreamError and the stream goes on. Without this, grpc fails the call before any handler sees it: UNKNOWN
for a message that does not parse, RESOURCE_EXHAUSTED (which our API reserves for "back off and retry") for
one over grpc's own receive limit, which also ends a whole ClassifyStream; and the metrics count the call
CANCELLED. grpc's limit stays, at twice ours (`grpc_receive_limit`), as the memory guard against larger
messages (such a call is counted CANCELLED). Must not know: what the handlers do.
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


@dataclass(frozen=True)
class Oversized:
    """A request message over the size limit, not parsed."""

    method: str
    size: int  # bytes
    limit: int

    def error(self) -> InvalidInputError:
        jobs = self.method == "SubmitJob"
        fix = "split its items over several jobs" if jobs else "send them in several requests"
        return InvalidInputError(
            f"the {self.method} request message has {self.size:,} bytes, more than the limit of "
            f"{self.limit:,} (SAFETY_MAX_MESSAGE_BYTES); {fix}",
            field="request",
            limit=self.limit,
            value=self.size,
            setting="SAFETY_MAX_MESSAGE_BYTES",
        )


def check_decoded(request: Any) -> Any:
    """`request`, or InvalidInputError when it did not parse or was too large."""
    if isinstance(request, Undecodable | Oversized):
        raise request.error()
    return request


def grpc_receive_limit(max_message_bytes: int) -> int:
    """grpc's own receive limit for a server whose requests may have `max_message_bytes`: above ours, so a
    message a little too large gets our error, and bounded (grpc holds a whole message before it parses)."""
    return min(2 * max_message_bytes, 2**31 - 1)


def tolerant(
    deserialize: Callable[[bytes], Any], method: str, max_bytes: int | None
) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return Oversized(method, len(data), max_bytes)
        try:
            return deserialize(data)
        except DecodeError as e:
            return Undecodable(method, str(e) or type(e).__name__)

    return parse


class DecodeInterceptor(WrappingInterceptor):
    """Our services' (`prefix`) handlers with a tolerant request deserializer (requests over `max_bytes`
    left unparsed); unary requests checked."""

    def __init__(self, prefix: str = "/safety.", max_bytes: int | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self.max_bytes = max_bytes

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
        parse = tolerant(handler.request_deserializer, method, self.max_bytes)
        return with_behavior(handler, behavior, parse)


def _checked_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(check_decoded(request), context)

    return checked


def _checked_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for message in behavior(check_decoded(request), context):
            yield message

    return checked


__all__ = ["DecodeInterceptor", "Oversized", "Undecodable", "check_decoded", "grpc_receive_limit"]
