"""The worker's /metrics also has the serving process's runtime series (process_*, python_info, python_gc_*)
and `safety_worker_build_info{version}`, in-process and in multiprocess (prefork) mode, scraped over HTTP."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.prometheus import scrape
from tests.worker.harness import REPO
from worker import metrics
from worker.metrics import MULTIPROC_ENV

RUNTIME = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
           "process_open_fds", 'python_gc_objects_collected_total{generation="0"}')  # fmt: skip


def build_info() -> str:
    return f'safety_worker_build_info{{version="{importlib.metadata.version("safety-classifier")}"}}'


def test_in_process_exporter_serves_runtime_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        samples = scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    for name in RUNTIME:
        assert name in samples, name
    assert samples["process_resident_memory_bytes"] > 0
    assert samples[build_info()] == 1
    assert any(key.startswith("python_info{") for key in samples)


def test_multiprocess_exporter_serves_the_main_processs_runtime_metrics(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, urllib.request
        from worker import metrics

        server = metrics.serve(0, addr="127.0.0.1")
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        sys.stdout.write(urllib.request.urlopen(url, timeout=5).read().decode())
        """
    )
    env = {MULTIPROC_ENV: str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = {line.rpartition(" ")[0] for line in out.stdout.splitlines() if not line.startswith("#")}
    for name in (*RUNTIME, build_info()):
        assert name in names, out.stdout
