"""Machine-readable error details in the `grpc-status-details-bin` trailer: a serialized `google.rpc.Status`
(the status code and message again, and `google.rpc.ErrorInfo`, `BadRequest` and `RetryInfo` messages packed
in `Any`s), as Google Cloud APIs, grpc-gateway and Envoy read them.

Owns: the optional import of googleapis-common-protos (`google.rpc`; the service runs without it, with the
details off: `OFF_BECAUSE` says why), `ErrorDetails` (the details as plain Python values, the same shape on
both ends), `pack(details)` (the trailer's bytes, None when off) and `unpack(data)` (the trailer's bytes ->
ErrorDetails), and the key of the retry hint sent beside them (`RETRY_PUSHBACK`). Must not know: the error
hierarchy or which reasons exist (service/errors.py), servers or clients. Needs neither grpcio-status nor
anything beyond protobuf and grpcio.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError

STATUS_DETAILS = "grpc-status-details-bin"  # the trailer's key (binary metadata: the value is bytes)
RETRY_PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's retry-hint trailer (A6), read by its retry policy too
DOMAIN = "safety.v1"  # ErrorInfo.domain of every error this API sends

status_pb2: Any
error_details_pb2: Any
OFF_BECAUSE: str | None = None  # why the details are off (None: on)
try:
    from google.rpc import error_details_pb2, status_pb2
except ImportError as e:  # the GPU image, an install from before the dependency: details off
    status_pb2 = error_details_pb2 = None
    OFF_BECAUSE = f"googleapis-common-protos is not installed ({e})"
except Exception as e:  # e.g. protobuf's VersionError: a runtime older than the one it was generated for
    status_pb2 = error_details_pb2 = None
    OFF_BECAUSE = f"googleapis-common-protos does not load ({type(e).__name__}: {e})"

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class ErrorDetails:
    """An error's status and its details: `reason` and `domain` from ErrorInfo (with its `metadata`, e.g.
    {"error_id": ...} on INTERNAL), `field` and `description` from BadRequest's field violation (the path,
    e.g. "items[3].text", and what is wrong with it), `retry_after_ms` from RetryInfo (None: no hint)."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = DOMAIN
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    field: str = ""
    description: str = ""
    retry_after_ms: int | None = None


def available() -> bool:
    """Can details be packed and unpacked here (is googleapis-common-protos importable)?"""
    return status_pb2 is not None


def pack(details: ErrorDetails) -> bytes | None:
    """The `grpc-status-details-bin` value for `details`: a google.rpc.Status with the same code and message
    and, packed in Any: ErrorInfo (when there is a reason), BadRequest (when there is a field), RetryInfo
    (when there is a retry hint). None when googleapis-common-protos is missing."""
    if status_pb2 is None:
        return None
    packed = []
    if details.reason:
        info = error_details_pb2.ErrorInfo(
            reason=details.reason, domain=details.domain, metadata=dict(details.metadata)
        )
        packed.append(info)
    if details.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=details.field, description=details.description
        )
        packed.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if details.retry_after_ms is not None:
        ms = max(0, details.retry_after_ms)
        delay = duration_pb2.Duration(seconds=ms // 1000, nanos=ms % 1000 * 1_000_000)
        packed.append(error_details_pb2.RetryInfo(retry_delay=delay))
    anys = []
    for message in packed:
        wrapped = any_pb2.Any()
        wrapped.Pack(message)
        anys.append(wrapped)
    status = status_pb2.Status(code=details.code.value[0], message=details.message, details=anys)
    return status.SerializeToString()


def unpack(data: bytes) -> ErrorDetails:
    """A `grpc-status-details-bin` value -> ErrorDetails (details of types other than the three above are
    skipped). ValueError when it does not parse; ModuleNotFoundError without googleapis-common-protos."""
    if status_pb2 is None:
        raise ModuleNotFoundError(OFF_BECAUSE, name="google.rpc")
    status = status_pb2.Status()
    try:
        status.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(f"{STATUS_DETAILS}: not a google.rpc.Status ({e})") from None
    values: dict[str, Any] = {"domain": ""}
    for detail in status.details:
        info, bad, retry = (
            error_details_pb2.ErrorInfo(),
            error_details_pb2.BadRequest(),
            error_details_pb2.RetryInfo(),
        )
        try:  # a detail of a known type whose bytes do not parse: the trailer as a whole is bad
            if detail.Unpack(info):
                values.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
            elif detail.Unpack(bad) and bad.field_violations:
                violation = bad.field_violations[0]
                values.update(field=violation.field, description=violation.description)
            elif detail.Unpack(retry):
                delay = retry.retry_delay
                values["retry_after_ms"] = delay.seconds * 1000 + delay.nanos // 1_000_000
        except DecodeError as e:
            raise ValueError(f"{STATUS_DETAILS}: a {detail.type_url} that does not parse ({e})") from None
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return ErrorDetails(code=code, message=status.message, **values)


__all__ = ["DOMAIN", "OFF_BECAUSE", "STATUS_DETAILS", "ErrorDetails", "available", "pack", "unpack"]
