"""The server's /metrics has the process's runtime series (prometheus-client's process, platform and GC
collectors) and `safety_build_info` for the model being served: a real server on port 0, scraped over HTTP."""

from __future__ import annotations

import importlib.metadata
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

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


def test_labelled_series_exist_at_zero_before_any_traffic(start_server: Callable[..., SafetyServer]) -> None:
    """Prometheus' increase() and rate() take a series' first sample as the baseline: a series that appears
    only with its first event (a device failure's dropped windows, then the replica exits) never shows an
    increase, and SafetyDeviceFailed would never fire. So a fresh server, before any call, exports every
    dropped-window reason, and every status code and the latency of the classification calls, at 0."""
    from service.metrics import CLASSIFY_METHODS, STATUS_CODES
    from service.scheduler import DROP_REASONS

    got = samples(start_server())
    # the reasons the scheduler drops windows for, as docs/api.md lists them
    assert set(DROP_REASONS) == {"cancelled", "deadline", "shutdown", "batch_failed", "device_failed"}
    for reason in DROP_REASONS:
        assert got[f'safety_dropped_windows_total{{reason="{reason}"}}'] == 0, reason
    assert got["safety_device_failed"] == 0
    assert {"OK", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"} <= set(STATUS_CODES)
    assert set(CLASSIFY_METHODS) == {"Classify", "ClassifyStream.request"}
    for method in CLASSIFY_METHODS:
        for code in STATUS_CODES:
            assert got[f'safety_requests_total{{code="{code}",method="{method}"}}'] == 0, (method, code)
        assert got[f'safety_request_duration_seconds_count{{method="{method}"}}'] == 0, method
        assert got[f'safety_request_duration_seconds_bucket{{le="+Inf",method="{method}"}}'] == 0, method


def test_a_scrape_counts_as_final_only_if_it_began_after_the_mark() -> None:
    """What the drain after a device failure waits for (service/server.py `_final_scrape`): a collection
    begun before the failure may have read the counters before it, so it does not count; one begun after
    the mark does, once it has read everything."""
    import threading

    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    from service.metrics import ScrapedRegistry

    entered, release = threading.Event(), threading.Event()

    class Held(Collector):
        def collect(self) -> Any:
            entered.set()
            assert release.wait(10)
            yield GaugeMetricFamily("held", "a collector that waits for the test", value=1)

    registry = ScrapedRegistry()
    registry.register(Held())
    early = threading.Thread(target=lambda: list(registry.collect()))
    early.start()
    assert entered.wait(10)
    mark = registry.mark()  # the event happens while `early` is in the middle of its collection
    release.set()
    early.join(10)
    assert not registry.scraped_since(mark)
    scraped = []
    registry.on_scrape = lambda: scraped.append(registry.scraped_since(mark))
    list(registry.collect())
    assert registry.scraped_since(mark) and scraped == [True]


def test_metrics_serve_on_ipv4_and_ipv6_and_close_without_waiting_out_a_half_second_poll() -> None:
    """/metrics on 127.0.0.1 and on [::1] (the address family from the address, as prometheus-client's
    `start_http_server` chose it), scraped, then closed: each close came within EXPORTER_POLL_S of its
    request. With the stdlib's 0.5 s poll, every drain blocked the event loop for up to half a second."""
    from service.metrics import EXPORTER_POLL_S, Metrics

    addresses = ["127.0.0.1:0"] * 4 + (["[::1]:0"] if socket.has_ipv6 and ipv6_loopback() else [])
    for address in addresses:
        metrics = Metrics()
        port = metrics.serve(address)
        host = address.rpartition(":")[0].strip("[]")
        with urllib.request.urlopen(f"http://{address.rpartition(':')[0]}:{port}/metrics", timeout=5) as page:
            assert b"safety_requests_total{" in page.read()
        started = time.monotonic()
        metrics.close()
        assert time.monotonic() - started < EXPORTER_POLL_S + 0.2, host
        with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
            pass  # nothing listens there any more


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
