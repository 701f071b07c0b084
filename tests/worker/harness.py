"""Real components for the worker tests: a fresh `redis-server` per use, real `celery worker` subprocesses.

Processes started here are ended here, by their own pid / process group, never by name.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Return the first truthy value of `predicate()`, or fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def retry_figure(notice: str) -> int:
    """N in a notice "…; retrying for up to Ns" (or "Ns more (no answer for Ms so far)")."""
    found = re.search(r"retrying for up to (\d+)s(?: more \(no answer for \d+s so far\))?$", notice)
    assert found, notice
    return int(found[1])


class RedisServer:
    """`redis-server` on a free port in its own directory; `appendonly=True` gives it a durable AOF."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_connect_timeout=2, socket_timeout=5)

    def start(self) -> RedisServer:
        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        )
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
               "--dir", str(self.directory), "--maxmemory-policy", "noeviction"]  # fmt: skip
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except redis.RedisError:
                return False

        poll(up, 15, f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, like a crashed or evicted pod."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the block, SIGCONT after it: a Redis that hangs (its connections are accepted by the
        kernel, nothing answers) rather than one that refuses them."""
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)


class Worker:
    """`python -m worker.cli worker` in its own process group (so kill -9 reaches the pool children)."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        hostname: str | None = "",
    ) -> None:
        """`hostname`: the node name; "" a unique one; None: none given (the product's default)."""
        self.log = log
        cmd = [sys.executable, "-m", "worker.cli", "worker", f"--pool={pool}", f"--concurrency={concurrency}",
               "--loglevel=INFO"]  # fmt: skip
        if hostname is not None:
            cmd.append(f"--hostname={hostname or f'w{free_port()}@%h'}")
        out = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill9(self) -> None:
        """kill -9 the whole worker: parent and pool processes."""
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def worker_env(redis_url: str, model_dir: Path, **settings: Any) -> dict[str, str]:
    """The environment of a worker or CLI subprocess: SAFETY_* settings given as keyword arguments. No
    metrics exporter (several workers run at once), unless `worker_metrics_port=PORT` is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFETY_")}
    env.update(
        SAFETY_REDIS_URL=redis_url, SAFETY_MODEL=str(model_dir), SAFETY_DEVICE="cpu", PYTHONUNBUFFERED="1"
    )
    env["SAFETY_WORKER_METRICS_PORT"] = "0"
    env.update({f"SAFETY_{k.upper()}": str(v) for k, v in settings.items()})
    return env


WORDS = [
    "bread",
    "weather",
    "attack",
    "recipe",
    "ignore",
    "previous",
    "instructions",
    "friend",
    "hurt",
    "code",
    "python",
    "garden",
    "movie",
    "hate",
    "kill",
    "process",
    "music",
    "travel",
    "paris",
    "dog",
]


def make_items(n: int, prefix: str = "item") -> list[dict[str, str]]:
    """Deterministic, varied items: prompts and responses (some with context), short and a few longer ones."""
    items = []
    for i in range(n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 9)]
        item = {"id": f"{prefix}-{i}", "text": f"{i} " + " ".join(words)}
        if i % 5 == 1:
            item["role"] = "response"
            item["context"] = "question " + WORDS[i % len(WORDS)]
        elif i % 5 == 2:
            item["role"] = "response"
        items.append(item)
    return items


def long_items(n: int, *, text_chars: int = 200) -> Iterator[dict[str, str]]:
    """`n` items of about `text_chars` characters each, made one at a time (never a list): a large job."""
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(text_chars // 5))
        yield {"id": f"long-{i}", "text": f"{i} {words}"[:text_chars]}


def traced_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """`fn()` and the peak of the memory Python allocated while it ran (tracemalloc, in bytes)."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class Spools(list):
    """Every spool (`tempfile.TemporaryFile`) made while it is installed, held here: only an explicit close
    closes one (a file nobody references is closed by the garbage collector, which would hide a leak)."""

    def install(self, monkeypatch: Any) -> Spools:
        real = tempfile.TemporaryFile

        def spy(*args: Any, **kwargs: Any) -> Any:
            file = real(*args, **kwargs)
            self.append(file)
            return file

        monkeypatch.setattr(tempfile, "TemporaryFile", spy)
        return self

    def all_closed(self) -> bool:
        """At least one spool was made, and every one is closed."""
        return bool(self) and all(f.closed for f in self)


def expected_lines(clf: Any, items: list[dict[str, str]], chunk_size: int) -> list[dict[str, Any]]:
    """What the job must produce: `clf.classify` on the same chunks, as result lines."""
    out = []
    for lo in range(0, len(items), chunk_size):
        for k, r in enumerate(clf.classify(items[lo : lo + chunk_size])):
            out.append(
                {"index": lo + k, **r.to_dict(), "id": items[lo + k].get("id") or str(lo + k), "error": None}
            )
    return out


def assert_same_line(got: dict[str, Any], want: dict[str, Any], thresholds: dict[str, float]) -> None:
    """Equal up to float noise between processes; a flag may differ only for a score on its threshold."""
    assert got.keys() == want.keys()
    for key in ("index", "id", "tokens", "windows", "spans", "error"):
        assert got[key] == want[key], (key, got, want)
    for key in ("scores", "logits"):
        assert got[key].keys() == want[key].keys()
        for label, value in want[key].items():
            assert math.isclose(got[key][label], value, rel_tol=1e-4, abs_tol=1e-5), (key, label, got, want)
    differ = set(got["flagged_labels"]) ^ set(want["flagged_labels"])
    assert all(abs(want["scores"][lab] - thresholds[lab]) < 1e-5 for lab in differ), (got, want)


def assert_job_output(
    lines: list[dict[str, Any]], want: list[dict[str, Any]], thresholds: dict[str, float]
) -> None:
    """Every item exactly once, in order, equal to the direct classification."""
    assert [line["index"] for line in lines] == list(range(len(want)))
    for got, exp in zip(lines, want, strict=True):
        assert_same_line(got, exp, thresholds)
