"""`safety serve` as a real process in tests: the command that runs it (`safety_command`), and the process
with the JSON records of its stderr read as they come (`serve_process`, `Served.log`)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def safety_command() -> list[str]:
    """The `safety` command of this interpreter's environment (`python -m model.cli` without the script)."""
    script = Path(sys.executable).parent / "safety"
    return [str(script)] if script.exists() else [sys.executable, "-m", "model.cli"]


def read_lines(stream: Any, sink: queue.Queue[str]) -> None:
    """Put each line of `stream` on `sink` (a reader thread's loop)."""
    for line in stream:
        sink.put(line)


@dataclass
class Served:
    """A `safety serve` process, the lines of its stderr (read in a thread) and the records seen so far."""

    proc: subprocess.Popen
    lines: queue.Queue[str]
    reader: threading.Thread
    seen: list[dict[str, Any]] = field(default_factory=list)

    def log(self, msg: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for_log(self.lines, msg, self.seen, timeout)

    def stop(self) -> None:
        """SIGTERM: exit 0 and a `stopped` line."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0
        self.log("stopped", timeout=5)


@contextmanager
def serve_process(args: list[str], env: dict[str, str], command: list[str] | None = None) -> Iterator[Served]:
    """`safety serve ARGS` (`command`: instead of `safety`), killed on the way out if a failed test left it
    running."""
    proc = subprocess.Popen(
        [*(command or safety_command()), "serve", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(proc.stderr, lines), daemon=True)
    reader.start()
    try:
        yield Served(proc, lines, reader)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
