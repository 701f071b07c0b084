"""The log formats of `safety serve` and `safety worker`: JSON lines, or text that keeps the extra fields."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

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


def test_json_logging_makes_python_warnings_records() -> None:
    """`safety serve` (and the worker before Celery's handlers exist) log through `configure`: under json a
    Python warning must not add a plain-text line (`FILE:LINE: UserWarning: ...`) to the JSON log."""
    script = (
        "import logging, warnings\n"
        "from model.logs import configure\n"
        "configure('INFO', 'json')\n"
        "logging.getLogger('safety.service').info('serving')\n"
        "warnings.warn('a library is deprecated', UserWarning)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines()]  # raises on a line that is not JSON
    assert [r["logger"] for r in records] == ["safety.service", "py.warnings"], records
    assert "UserWarning: a library is deprecated" in records[1]["msg"]
