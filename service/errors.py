"""The one mapping from the product's error hierarchy (model.errors) to gRPC status codes and error details.

Owns: `STATUS_CODES` (the table of codes), `REASONS` (the table of ErrorInfo reasons), `status_for(exc)`,
`describe(exc)` (the status, caller-facing message and machine-readable details of an error, also for
ClassifyStream's per-request errors), `trailers(details)` (the retry hint of RESOURCE_EXHAUSTED and of
UNAVAILABLE JOB_BUSY as `grpc-retry-pushback-ms`, or -1 when it runs past the call's deadline:
`pushback_ms`; and every error's `grpc-status-details-bin`: a
google.rpc.Status with ErrorInfo, BadRequest for INVALID_ARGUMENT, RetryInfo for a retry hint; packed by
service/richstatus.py, left out when googleapis-common-protos is missing), and `ErrorInterceptor`, which
turns a `SafetyError` raised by any handler into its status code, message and trailers, and anything
unexpected into INTERNAL with an error id that is logged together with the traceback (the caller sees the
id, never the traceback); and `final_code(context, deadline)`, the status a call (or a request of a
ClassifyStream) ends with when it stops other than by returning, as the metrics count it, with
`call_deadline(context)`, the deadline it compares with. Must not know: what the handlers do.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import StatusCode

from model.errors import (
    CheckpointError,
    ConfigError,
    DeadlineExceededError,
    DeviceFailedError,
    FailedPreconditionError,
    InvalidInputError,
    JobBusyError,
    ModelLoadingError,
    NotFoundError,
    OverloadedError,
    SafetyError,
    ShuttingDownError,
    TooManyCallsError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedError,
)
from service import requestid, richstatus
from service.deadlines import deadline_passed
from service.handlers import WrappingInterceptor, with_behavior
from service.richstatus import RETRY_PUSHBACK, ErrorDetails

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


# ErrorInfo.reason (domain "safety.v1") of each class, most specific first: stable identifiers, documented in
# docs/api.md ("Error details"). One per class; the classes the job RPCs alone raise are named for jobs.
REASONS: tuple[tuple[type[SafetyError], str], ...] = (
    (InvalidInputError, "INVALID_INPUT"),  # BadRequest names the field
    (TooManyCallsError, "TOO_MANY_CALLS"),  # SAFETY_MAX_CONCURRENT_RPCS / _HEALTH_WATCHES; RetryInfo
    (OverloadedError, "QUEUE_FULL"),  # RetryInfo when the scheduler gave a hint
    (DeadlineExceededError, "DEADLINE_EXCEEDED"),
    (ModelLoadingError, "MODEL_LOADING"),
    (ShuttingDownError, "SHUTTING_DOWN"),
    (DeviceFailedError, "DEVICE_FAILED"),
    (JobBusyError, "JOB_BUSY"),  # SubmitJob of a job another process is submitting
    (UnavailableError, "BACKEND_UNAVAILABLE"),  # Redis unreachable, no room for a job's temporary file
    (NotFoundError, "JOB_NOT_FOUND"),  # a job, or a result of it: unknown, expired, deleted or lost
    (UnauthenticatedError, "UNAUTHENTICATED"),
    (UnsupportedError, "JOBS_UNSUPPORTED"),  # the jobs API without the worker extra
    (FailedPreconditionError, "JOB_NOT_READY"),  # delete an open job, wait on a stalled submission
    (ConfigError, "SERVER_MISCONFIGURED"),
    (CheckpointError, "SERVER_MISCONFIGURED"),
)
INTERNAL_REASON = "INTERNAL"  # anything unexpected; ErrorInfo.metadata["error_id"] is the logged id
# The classes that carry a retry hint (`retry_after_ms`): sent as RetryInfo and `grpc-retry-pushback-ms`.
RETRY_HINTED: tuple[type[OverloadedError | JobBusyError], ...] = (OverloadedError, JobBusyError)


def status_for(exc: BaseException) -> StatusCode:
    for cls, code in STATUS_CODES:
        if isinstance(exc, cls):
            return code
    return StatusCode.INTERNAL


def reason_for(exc: BaseException) -> str:
    for cls, reason in REASONS:
        if isinstance(exc, cls):
            return reason
    return INTERNAL_REASON


# What the caller's client accepts in trailing metadata: gRPC refuses more than 8 KiB at random and more than
# 16 KiB always, as RESOURCE_EXHAUSTED (a bad request would then look like an overload to retry). The message
# travels twice (grpc-message, percent-encoded: up to 3 bytes per byte; and the Status, base64: 4 per 3) with
# the description once more: capped in UTF-8 bytes, the trailers stay under about 4.5 KiB.
MAX_MESSAGE_BYTES = 640
MAX_FIELD_BYTES = 200


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (at a character boundary, ending in "…") when longer; a
    message quotes what the caller sent (a threshold label, a job id), whatever its length."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def describe(exc: BaseException) -> ErrorDetails:
    """The status `exc` maps to, the message the caller sees, and its details: the reason; for
    INVALID_ARGUMENT the field's path and what is wrong with it; for RESOURCE_EXHAUSTED and JOB_BUSY the retry
    hint (`RETRY_HINTED`). An unexpected error is logged with its traceback under a fresh error id, and the
    caller sees only the id (in the message and in the details' metadata). Texts are clipped
    (`MAX_MESSAGE_BYTES`, `MAX_FIELD_BYTES`) so the trailers always fit the caller's metadata limit."""
    code = status_for(exc)
    if code is not StatusCode.INTERNAL:
        reason, message = reason_for(exc), clip(str(exc), MAX_MESSAGE_BYTES)
        if isinstance(exc, InvalidInputError):
            field, description = clip(exc.where, MAX_FIELD_BYTES), clip(exc.reason, MAX_MESSAGE_BYTES)
            return ErrorDetails(
                code, message, reason, metadata=limit_metadata(exc), field=field, description=description
            )
        if isinstance(exc, RETRY_HINTED) and exc.retry_after_ms is not None:
            return ErrorDetails(code, message, reason, retry_after_ms=max(0, int(exc.retry_after_ms)))
        return ErrorDetails(code, message, reason)
    error_id = uuid.uuid4().hex[:16]
    log.error(
        "internal error %s in %s",
        error_id,
        type(exc).__name__,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"error_id": error_id},
    )
    message = f"internal error (error id {error_id}); the server log has the details"
    return ErrorDetails(code, message, INTERNAL_REASON, metadata={"error_id": error_id})


def limit_metadata(exc: InvalidInputError) -> dict[str, str]:
    """ErrorInfo.metadata of an input over a size limit: "limit" (the largest accepted), "value" (what was
    sent) and "setting" (the variable that sets the limit), for a client that splits and retries by program
    rather than by reading the message. Empty for other input errors."""
    if exc.limit is None:
        return {}
    out = {"limit": str(exc.limit), "setting": exc.setting}
    if exc.value is not None:
        out["value"] = str(exc.value)
    return out


STATUS_DETAILS = richstatus.STATUS_DETAILS  # "grpc-status-details-bin"


# A retry hint that leaves less than this before the call's deadline is not worth a retry (the retried call
# needs time to be served, and the deadline the server sees is rounded up and ignores the network).
RETRY_MARGIN_S = 0.05


def pushback_ms(retry_after_ms: int, time_left_s: float | None) -> int:
    """The `grpc-retry-pushback-ms` of an error with a retry hint: the hint, or -1 (gRPC's "do not retry",
    A6) when a retry after it would start within RETRY_MARGIN_S of the call's deadline or after it
    (`time_left_s` from now; None: no deadline). gRPC's retry policy would otherwise wait out the deadline and
    end the call DEADLINE_EXCEEDED, where the caller (a gateway with a tight deadline) is better served by
    the refusal at once; the details' RetryInfo still carries the hint."""
    if time_left_s is not None and retry_after_ms / 1000 + RETRY_MARGIN_S >= time_left_s:
        return -1
    return retry_after_ms


def trailers(details: ErrorDetails, time_left_s: float | None = None) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata of an error: the retry hint as `grpc-retry-pushback-ms` (`pushback_ms`, for a call
    with `time_left_s` before its deadline), and the details as `grpc-status-details-bin`. Without
    googleapis-common-protos there are no details: the trailer, then the hint's only carrier, is always the
    hint itself."""
    out: list[tuple[str, str | bytes]] = []
    packed = richstatus.pack(details)
    if details.retry_after_ms is not None:
        hint = details.retry_after_ms
        out.append((RETRY_PUSHBACK, str(pushback_ms(hint, time_left_s) if packed is not None else hint)))
    if packed is not None:
        out.append((STATUS_DETAILS, packed))
    return tuple(out)


async def abort_for(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    """Abort the call with the status that `exc` maps to, its message and its trailers, with the call's
    request id (service/requestid.py: the abort's trailers replace those set before) (always raises)."""
    details = describe(exc)
    metadata = trailers(details, context.time_remaining()) + requestid.trailer()
    await context.abort(details.code, details.message, trailing_metadata=metadata)


def final_code(context: grpc.aio.ServicerContext, deadline: float | None) -> str:
    """The status a call that raised ends with: the one the handler set (abort), else DEADLINE_EXCEEDED (at
    or near the call's `deadline`, time.monotonic()) or CANCELLED: the client went away, or grpc ended the
    call, before it was answered."""
    set_code = context.code()
    if set_code is not None:
        return set_code.name
    return "DEADLINE_EXCEEDED" if deadline_passed(deadline, time.monotonic()) else "CANCELLED"


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline in time.monotonic() (None: it has none)."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


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
