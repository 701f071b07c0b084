"""The one mapping from the product's error hierarchy (model.errors) to gRPC status codes.

Owns: `STATUS_CODES` (the table), `status_for(exc)`, `describe(exc)` (status and caller-facing message, also
for ClassifyStream's per-request errors), `trailers_for(exc)` (RESOURCE_EXHAUSTED's `grpc-retry-pushback-ms`),
and `ErrorInterceptor`, which turns a `SafetyError`
raised by any handler into its status code and message, and anything unexpected into INTERNAL with an error
id that is logged together with the traceback (the caller sees the id, never the traceback). Must not know:
what the handlers do.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import StatusCode

from model.errors import (
    CheckpointError,
    ConfigError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    SafetyError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedError,
)
from service.handlers import WrappingInterceptor, with_behavior

log = logging.getLogger("safety.service")

# Most specific first: the first class an exception is an instance of decides.
STATUS_CODES: tuple[tuple[type[SafetyError], StatusCode], ...] = (
    (InvalidInputError, StatusCode.INVALID_ARGUMENT),  # don't retry
    (OverloadedError, StatusCode.RESOURCE_EXHAUSTED),  # back off, retry
    (DeadlineExceededError, StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, StatusCode.UNAVAILABLE),  # loading or draining: retry elsewhere
    (NotFoundError, StatusCode.NOT_FOUND),
    (UnauthenticatedError, StatusCode.UNAUTHENTICATED),
    (UnsupportedError, StatusCode.UNIMPLEMENTED),  # e.g. the jobs API without the worker extra
    (FailedPreconditionError, StatusCode.FAILED_PRECONDITION),  # e.g. a job whose submit stopped: resume it
    (ConfigError, StatusCode.FAILED_PRECONDITION),  # the server's model/config, not the caller's input
    (CheckpointError, StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BaseException) -> StatusCode:
    for cls, code in STATUS_CODES:
        if isinstance(exc, cls):
            return code
    return StatusCode.INTERNAL


def describe(exc: BaseException) -> tuple[StatusCode, str]:
    """The status `exc` maps to and the message the caller sees. An unexpected error is logged with its
    traceback under a fresh error id, and the caller sees only the id."""
    code = status_for(exc)
    if code is not StatusCode.INTERNAL:
        return code, str(exc)
    error_id = uuid.uuid4().hex[:16]
    log.error(
        "internal error %s in %s",
        error_id,
        type(exc).__name__,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"error_id": error_id},
    )
    return code, f"internal error (error id {error_id}); the server log has the details"


RETRY_PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's retry hint (A6), honoured by its retry policy


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of the status `exc` maps to: an OverloadedError's `retry_after_ms` as
    `grpc-retry-pushback-ms`."""
    if isinstance(exc, OverloadedError) and exc.retry_after_ms is not None:
        return ((RETRY_PUSHBACK, str(max(0, int(exc.retry_after_ms)))),)
    return ()


async def abort_for(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    """Abort the call with the status that `exc` maps to, and its trailers (always raises)."""
    code, message = describe(exc)
    await context.abort(code, message, trailing_metadata=trailers_for(exc))


class ErrorInterceptor(WrappingInterceptor):
    """Wraps the unary-unary, unary-stream and stream-stream handlers of our own services (`prefix`) in
    `abort_for`; the health and reflection services keep their own behaviour."""

    def __init__(self, prefix: str = "/safety.") -> None:
        super().__init__()
        self.prefix = prefix

    def applies(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> bool:
        return details.method.startswith(self.prefix)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return with_behavior(handler, _wrap_unary(handler.unary_unary))
        stream = handler.unary_stream or handler.stream_stream
        if stream is not None:
            return with_behavior(handler, _wrap_stream(stream))
        return handler


def _passthrough(exc: BaseException) -> bool:
    # AbortError: the handler already chose a status; CancelledError: the call is gone.
    return isinstance(exc, grpc.aio.AbortError | grpc.RpcError) or not isinstance(exc, Exception)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except BaseException as exc:
            if _passthrough(exc):
                raise
            await abort_for(exc, context)

    return wrapped


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for message in result:
                    yield message
            else:  # a handler that writes with context.write() and returns a coroutine
                await result
        except BaseException as exc:
            if _passthrough(exc):
                raise
            await abort_for(exc, context)

    return wrapped
