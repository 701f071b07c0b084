"""The machine-readable error details the service sends, as the tests read them: the `grpc-status-details-bin`
trailer's google.rpc.Status (`status_of`) and its ErrorInfo, BadRequest and RetryInfo (`unpacked`)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

DETAILS = "grpc-status-details-bin"
ErrorInfo, BadRequest, RetryInfo = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
)


def status_of(err: grpc.RpcError) -> status_pb2.Status:
    """The error's google.rpc.Status, checked to repeat the call's code and message."""
    trailers = dict(err.trailing_metadata() or ())
    assert DETAILS in trailers, trailers
    status = status_pb2.Status.FromString(trailers[DETAILS])
    assert status.code == err.code().value[0] and status.message == err.details(), status
    return status


def unpacked(status: status_pb2.Status) -> dict[type[Message], Any]:
    """The status's details by type; every one of them is one of the three this API sends, once."""
    out: dict[type[Message], Any] = {}
    for detail in status.details:
        [cls] = [c for c in (ErrorInfo, BadRequest, RetryInfo) if detail.Is(c.DESCRIPTOR)]
        assert cls not in out, status
        out[cls] = cls()
        assert detail.Unpack(out[cls])
    return out
