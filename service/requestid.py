"""The id of a call, to match a gateway's records with the server's log.

Owns: REQUEST_ID_KEY (`x-request-id`, the header gateways and proxies such as Envoy and nginx already pass),
`request_id(metadata)` (the caller's id when it is `valid`: 1 to MAX_LENGTH printable ASCII characters; else a
new one, 32 hex digits), `current` (the id of the call that the running asyncio task serves: grpc.aio runs
each call in a task of its own, so a value set there stays with that call), `trailer()` (the id as trailing
metadata, which every answer carries) and `install_record_factory()`, which gives every log record made while
serving a call a `request_id` field (the error of an INTERNAL answer, a job's log lines). The field is set
when the record is made, so `request_id` is reserved: a log call inside a call that passed it in `extra` would
raise KeyError. Work handed to a pool thread for a call (its tokenization, the job client's Redis calls)
runs in a copy of the call's context, so its lines carry the id too; the runner's lines (a batch of many
calls) carry none. Must not know: the handlers, the model.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

REQUEST_ID_KEY = "x-request-id"
MAX_LENGTH = 128
current: ContextVar[str | None] = ContextVar("request_id", default=None)


def valid(value: object) -> bool:
    """An id the server keeps: 1 to MAX_LENGTH printable ASCII characters (it goes into log lines and
    trailers as it is)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_LENGTH and value.isascii() and value.isprintable()


def request_id(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The call's id: the caller's `x-request-id` (its first) when it is `valid`, else a new uuid4 in hex."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if valid(value):
                return value
            break
    return uuid.uuid4().hex


def trailer() -> tuple[tuple[str, str], ...]:
    """The running call's id as trailing metadata (none outside a call)."""
    rid = current.get()
    return () if rid is None else ((REQUEST_ID_KEY, rid),)


_installed = False


def install_record_factory() -> None:
    """Make every log record created while a call is served carry its `request_id` (once per process; the
    factory in place before is kept and called first)."""
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        rid = current.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return record

    logging.setLogRecordFactory(factory)
