"""Prometheus metrics of the batch workers, served by `safety worker` on SAFETY_WORKER_METRICS_PORT.

Owns: the metric names and buckets (`safety_worker_items_total{outcome}`,
`safety_worker_chunks_total{outcome}`, `safety_worker_chunks_resent_total` (counted by the lost-chunk
sweeper in the main process), `safety_worker_chunk_seconds`; the Grafana dashboard's job panels chart
the first two), the process's one `Metrics` that the chunk task counts into, and the HTTP exporter, which
also serves the serving process's own process_*, python_info and python_gc_* series and
`safety_worker_build_info{version}`. With the
solo and threads pools the tasks run in the process that serves, so the exporter serves that `Metrics`'
registry. With prefork they run in child processes: `safety worker` sets PROMETHEUS_MULTIPROC_DIR before
anything imports prometheus-client, each child writes its counts to files there, and the exporter in the
parent serves their sum (prometheus-client's multiprocess mode). Must not know: Celery, Redis, the model.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from model import package_version

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ITEM_OUTCOMES = ("ok", "failed")
# done: results written; retried: handed back to the queue after an error (the next delivery counts again);
# dead_lettered: given up after SAFETY_MAX_ATTEMPTS, items written as failed; skipped: nothing to do (the job
# is cancelled, finished or gone, or a redelivery found every result written); lost_hold: stopped midway, its
# message's hold lost to another delivery (a slice outlasted the visibility timeout; its stored slices stay).
CHUNK_OUTCOMES = ("done", "retried", "dead_lettered", "skipped", "lost_hold")
CHUNK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class BuildInfo(Collector):
    """`safety_worker_build_info{version}` = 1, computed at scrape time (a Gauge would go through the
    multiprocess files in a prefork worker's main process)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "safety_worker_build_info", "1, labelled with the package version", labels=["version"]
        )
        family.add_metric([package_version()], 1)
        yield family


def add_runtime_collectors(registry: CollectorRegistry) -> None:
    """This process's process_* (CPU, memory, open fds, start time), python_info and python_gc_* series, and
    the build info: what the default registry would have, which a fresh registry lacks."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(BuildInfo())


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        add_runtime_collectors(r)
        self.items = Counter(
            "safety_worker_items",
            "job items written, by outcome: ok (classified) or failed (refused by the engine, or its chunk "
            "dead-lettered); an item written by an earlier delivery is not counted again",
            ["outcome"],
            registry=r,
        )
        self.chunks = Counter(
            "safety_worker_chunks",
            "chunk deliveries by outcome: done, retried, dead_lettered, skipped, lost_hold",
            ["outcome"],
            registry=r,
        )
        self.resent = Counter(
            "safety_worker_chunks_resent",
            "chunk messages the lost-chunk sweeper sent again because the broker had lost them (a worker "
            "killed between taking a message and recording it)",
            registry=r,
        )
        self.chunk_seconds = Histogram(
            "safety_worker_chunk_seconds",
            "wall time of a chunk delivery that did work (done, retried, dead_lettered), model load included",
            buckets=CHUNK_BUCKETS,
            registry=r,
        )
        for outcome in ITEM_OUTCOMES:  # every series exists from the start, at 0
            self.items.labels(outcome=outcome)
        for outcome in CHUNK_OUTCOMES:
            self.chunks.labels(outcome=outcome)

    def chunk(self, outcome: str, seconds: float, ok: int = 0, failed: int = 0) -> None:
        """One delivery of a chunk ended with `outcome`, having newly written `ok` and `failed` items."""
        if outcome not in CHUNK_OUTCOMES:
            raise ValueError(f"unknown chunk outcome {outcome!r}; outcomes are {CHUNK_OUTCOMES}")
        self.chunks.labels(outcome=outcome).inc()
        if outcome != "skipped":
            self.chunk_seconds.observe(seconds)
        if ok:
            self.items.labels(outcome="ok").inc(ok)
        if failed:
            self.items.labels(outcome="failed").inc(failed)


_process: Metrics | None = None
_lock = threading.Lock()


def process_metrics() -> Metrics:
    """This process's `Metrics` (created on first use: in a prefork child, after the fork)."""
    global _process
    with _lock:
        if _process is None:
            _process = Metrics()
        return _process


def multiprocess() -> bool:
    """Whether counts go to PROMETHEUS_MULTIPROC_DIR files (prefork) rather than this process's memory."""
    return MULTIPROC_ENV in os.environ  # as prometheus_client decides it


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Start /metrics on `port` (0: any free port) in a daemon thread; returns the HTTP server (its
    `server_port` is the bound port; `shutdown()` stops it). Raises OSError when the port cannot be bound."""
    if multiprocess():
        if not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                f"{MULTIPROC_ENV} was set after prometheus_client was imported: counts would stay in memory"
            )
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        add_runtime_collectors(registry)  # the main process's own
    else:
        registry = process_metrics().registry
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
