"""The log formats of `safety serve` and `safety worker`: JSON lines, or text that keeps the extra fields."""

from __future__ import annotations

import json
import logging
import sys

from model.logs import JsonFormatter, TextFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord(
        {"name": "safety.service", "levelname": "INFO", "levelno": 20, "msg": "serving"}
    )
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_extra_fields() -> None:
    out = json.loads(JsonFormatter().format(record(port=50051, model="tiny v1")))
    assert (out["level"], out["logger"], out["msg"]) == ("INFO", "safety.service", "serving")
    assert (out["port"], out["model"]) == (50051, "tiny v1")


def test_text_lines_keep_the_extra_fields_after_the_message() -> None:
    line = TextFormatter().format(record(port=50051, model="tiny v1", empty=""))
    assert line.endswith(' INFO safety.service: serving port=50051 model="tiny v1" empty=""'), line
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record(error_id="3f2a")
        failed.exc_info = sys.exc_info()
    text = TextFormatter().format(failed)
    first, *rest = text.splitlines()
    assert first.endswith("serving error_id=3f2a") and rest[-1] == "ValueError: boom"
