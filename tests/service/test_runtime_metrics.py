"""The server's /metrics has the process's runtime series (prometheus-client's process, platform and GC
collectors) and `safety_build_info` for the model being served: a real server on port 0, scraped over HTTP."""

from __future__ import annotations

import importlib.metadata

from service.server import SafetyServer
from tests.prometheus import scrape


def samples(app: SafetyServer) -> dict[str, float]:
    return scrape(app.metrics_port)


def test_runtime_metrics_and_build_info(server: SafetyServer) -> None:
    got = samples(server)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                 "process_open_fds", 'python_gc_objects_collected_total{generation="0"}'):  # fmt: skip
        assert name in got, name
    assert got["process_resident_memory_bytes"] > 0
    assert any(key.startswith("python_info{") for key in got)
    clf = server.classifier
    version = importlib.metadata.version("safety-classifier")
    labels = f'device="{clf.device}",dtype="{clf.dtype}",model="{clf.name}",version="{version}"'
    assert got[f"safety_build_info{{{labels}}}"] == 1
    assert sum(1 for key in got if key.startswith("safety_build_info")) == 1
