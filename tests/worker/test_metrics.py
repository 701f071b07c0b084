"""worker.metrics: the names the dashboard charts, the exporter in-process (solo/threads pools), the sum over
forked pool processes (prefork, multiprocess mode), and a real prefork `safety worker` scraped over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.prometheus import scrape
from tests.worker.harness import REPO, RedisServer, Worker, free_port, make_items, poll, worker_env
from worker import metrics
from worker.jobs import JobClient
from worker.metrics import CHUNK_OUTCOMES, ITEM_OUTCOMES, MULTIPROC_ENV, Metrics


def test_every_series_exists_at_zero_and_outcomes_are_checked() -> None:
    m = Metrics()
    for outcome in ITEM_OUTCOMES:
        assert m.registry.get_sample_value("safety_worker_items_total", {"outcome": outcome}) == 0
    for outcome in CHUNK_OUTCOMES:
        assert m.registry.get_sample_value("safety_worker_chunks_total", {"outcome": outcome}) == 0
    assert set(CHUNK_OUTCOMES) == {"done", "retried", "dead_lettered", "skipped", "lost_hold"}
    with pytest.raises(ValueError, match="unknown chunk outcome 'dead-lettered'"):
        m.chunk("dead-lettered", 1.0)
    m.chunk("skipped", 0.0)
    assert m.registry.get_sample_value("safety_worker_chunk_seconds_count") == 0  # skipped: not timed


def test_in_process_exporter_serves_this_processs_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        before = scrape(server.server_port)
        metrics.process_metrics().chunk("done", 2.0, ok=3, failed=1)
        after = scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    added = {
        'safety_worker_items_total{outcome="ok"}': 3,
        'safety_worker_items_total{outcome="failed"}': 1,
        'safety_worker_chunks_total{outcome="done"}': 1,
        'safety_worker_chunks_total{outcome="retried"}': 0,
        "safety_worker_chunk_seconds_count": 1,
    }
    assert {key: after[key] - before[key] for key in added} == added


def test_multiprocess_mode_must_be_chosen_before_prometheus_is_imported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))  # too late: this process counts in memory
    with pytest.raises(RuntimeError, match="set after prometheus_client was imported"):
        metrics.serve(0, addr="127.0.0.1")


def test_the_parent_serves_the_sum_of_its_forked_children(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import multiprocessing, sys, urllib.request
        from worker import metrics

        def child(ok):
            metrics.process_metrics().chunk("done", 0.5, ok=ok, failed=1)

        if __name__ == "__main__":
            fork = multiprocessing.get_context("fork")
            for ok in (2, 3):
                p = fork.Process(target=child, args=(ok,))
                p.start()
                p.join()
            server = metrics.serve(0, addr="127.0.0.1")
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            sys.stdout.write(urllib.request.urlopen(url, timeout=5).read().decode())
        """
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = set(out.stdout.splitlines())
    assert 'safety_worker_items_total{outcome="ok"} 5.0' in lines, out.stdout
    assert 'safety_worker_items_total{outcome="failed"} 2.0' in lines
    assert 'safety_worker_chunks_total{outcome="done"} 2.0' in lines
    assert "safety_worker_chunk_seconds_count 2.0" in lines


def test_a_port_in_use_fails_the_worker_naming_the_variable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**worker_env(f"redis://127.0.0.1:{free_port()}/0", tmp_path), "TMPDIR": str(tmp_path)}
        env["SAFETY_WORKER_METRICS_PORT"] = str(port)
        out = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--pool=prefork"], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "SAFETY_WORKER_METRICS_PORT" in out.stderr and f"port {port}" in out.stderr, out.stderr
    assert not list(tmp_path.glob("safety-worker-metrics-*"))  # the multiprocess directory is removed


def test_a_prefork_worker_exports_its_pool_processes_counts(
    redis_server: RedisServer, job_client: Callable[..., JobClient], tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = worker_env(redis_server.url, tiny_model_dir, queue="scraped", worker_metrics_port=port)
    worker = Worker({**env, "TMPDIR": str(tmp_path)}, tmp_path / "worker.log", pool="prefork")
    try:
        client = job_client(redis_server.url, queue="scraped", chunk_size=2)
        job = client.submit(make_items(5, prefix="scraped")).status.job_id
        status = client.wait(job, timeout=120)
        assert (status.state, status.done) == ("done", 5), worker.text()[-3000:]
        want = {'safety_worker_items_total{outcome="ok"}': 5, 'safety_worker_chunks_total{outcome="done"}': 3}

        def counted() -> dict[str, float] | None:
            samples = scrape(port)
            return samples if all(samples.get(k) == v for k, v in want.items()) else None

        got = poll(counted, timeout=10, what=f"{want} at :{port}/metrics")
        assert got["safety_worker_chunk_seconds_count"] == 3
        assert got['safety_worker_items_total{outcome="failed"}'] == 0
        assert len(list(tmp_path.glob("safety-worker-metrics-*/*.db"))) >= 1  # written by the pool process
        # SAFETY_LOG_FORMAT=text (the default): the exporter's address is a log line like the others
        address = f" INFO safety.worker: Prometheus metrics on :{port}/metrics metrics_port={port}"
        assert [line for line in worker.text().splitlines() if line.endswith(address)], worker.text()[:3000]
    finally:
        worker.stop()
