"""Structured logging for `safety serve` and `safety worker`: one JSON object per line (or plain text).

Owns: the log format. Records carry `ts`, `level`, `logger`, `msg`, any `extra={...}` fields (e.g.
`error_id`, a worker's `task_id`) and `exc` with the traceback. `configure` sets up the root logger (serve;
the worker until Celery sets up its own handlers, to which it then hands `JsonFormatter`). Must not know:
gRPC, Celery or the model.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call gave with `extra={...}` (and any a handler added, e.g. a worker's task_id)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`ts level logger: msg key=value ...` (a value with spaces in JSON quotes), then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        for key, value in extras(record).items():
            text = str(value)
            line += f" {key}={json.dumps(text) if not text or any(c.isspace() for c in text) else text}"
        return line


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """The root logger writes `fmt` ("json" or "text") lines to stderr at `level`. With json, Python warnings
    (a library's deprecation, ...) are records too (logger `py.warnings`), not plain-text lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if fmt == "json":
        logging.captureWarnings(True)
