"""`safety serve` as a real process: JSON logs, `safety classify --remote` against it, SIGTERM -> exit 0."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest


def safety_command() -> list[str]:
    script = Path(sys.executable).parent / "safety"
    return [str(script)] if script.exists() else [sys.executable, "-m", "model.cli"]


def read_lines(stream: Any, sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)


def wait_for_log(
    lines: queue.Queue[str], msg: str, seen: list[dict[str, Any]], timeout: float
) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {msg!r} log line within {timeout}s; saw {seen}") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = {"raw": line}  # e.g. a traceback or a library's plain-text warning
        seen.append(record)
        if record.get("msg") == msg:
            return record


@pytest.mark.slow
def test_serve_classify_remote_and_sigterm(tiny_model_dir: Path) -> None:
    env = {**os.environ, "SAFETY_LOG_FORMAT": "json", "SAFETY_METRICS_ADDRESS": "off", "SAFETY_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [*safety_command(), "serve", "--model", str(tiny_model_dir), "--address", "127.0.0.1:0",
         "--drain-grace-s", "5"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stderr, lines), daemon=True).start()
    seen: list[dict[str, Any]] = []
    try:
        port = wait_for_log(lines, "listening", seen, timeout=60)["port"]
        wait_for_log(lines, "serving", seen, timeout=60)
        out = subprocess.run(
            [*safety_command(), "classify", "--remote", f"127.0.0.1:{port}", "How do I bake bread?",
             "--threshold", "hate=0.99"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        [result] = [json.loads(line) for line in out.stdout.splitlines()]
        assert set(result) >= {
            "id",
            "scores",
            "logits",
            "flagged",
            "flagged_labels",
            "tokens",
            "windows",
            "spans",
        }
        assert "hate" in result["scores"] and "hate" not in result["flagged_labels"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        wait_for_log(lines, "stopped", seen, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_attention_setting_reaches_the_engine(tiny_model_dir: Path) -> None:
    """SAFETY_ATTENTION picks the kernel: forcing CUDA's varlen kernel on the CPU fails start-up, by name."""
    env = {**os.environ, "SAFETY_LOG_FORMAT": "text", "SAFETY_METRICS_ADDRESS": "off", "SAFETY_DEVICE": "cpu",
           "SAFETY_ATTENTION": "varlen"}  # fmt: skip
    cmd = [*safety_command(), "serve", "--model", str(tiny_model_dir), "--address", "127.0.0.1:0"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "startup failed: backend: 'varlen' needs a CUDA device" in res.stderr + res.stdout
