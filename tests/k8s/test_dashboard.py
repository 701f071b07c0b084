"""The Grafana dashboard (k8s/components/grafana-dashboard/safety-classifier.json) charts real metrics.

Owns: the dashboard's structure and the cross-check of every metric its queries name against the metrics the
service and the workers register (service/metrics.py, worker/metrics.py). Must not know: Grafana beyond the
dashboard JSON model.
"""

from __future__ import annotations

import json
import re
from typing import Any

from service.metrics import Metrics
from tests.k8s.render import K8S
from worker.metrics import Metrics as WorkerMetrics

DASHBOARD = json.loads((K8S / "components" / "grafana-dashboard" / "safety-classifier.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
# Target labels a scrape config or relabeling adds; they differ between the gRPC and the worker pods.
SCRAPE_LABELS = {"job", "instance", "pod", "container", "service", "endpoint", "app_kubernetes_io_name"}


def exported(registry: Any) -> set[str]:
    """Sample names Prometheus will see: counters gain _total, histograms _bucket/_count/_sum."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {fam.name + s for fam in registry.collect() for s in suffixes[fam.type]}


def exprs() -> list[str]:
    return [t["expr"] for p in PANELS for t in p["targets"]]


def test_structure() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in PANELS:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for e in exprs():
        assert e.count("(") == e.count(")") and e.count("{") == e.count("}"), e
        assert 'namespace="$namespace"' in e, f"not filtered by the namespace variable: {e}"


def test_queries_match_every_scraped_pod() -> None:
    """Queries select by namespace and the metrics' own labels, never by labels the scrape config invents
    (`job`, `instance`, `pod`, ...): those differ between the gRPC pods and the worker pods, and between
    annotation-based scraping and a PodMonitor, so such a filter would silently empty a panel."""
    for e in exprs():
        selectors = re.findall(r"\{([^}]*)\}", e)
        matched = {label for sel in selectors for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", sel)}
        assert "namespace" in matched and not matched & SCRAPE_LABELS, f"filters on {sorted(matched)}: {e}"


def test_queries_name_real_metrics() -> None:
    known = exported(Metrics().registry) | exported(WorkerMetrics().registry)
    named = {m for e in exprs() for m in re.findall(r"\b(safety_[a-z0-9_]+)\b", e)}
    assert named, "no safety_* metric in any query"
    assert named <= known, f"queries name metrics nobody exports: {sorted(named - known)}"


def test_covers_what_operators_watch() -> None:
    """Request rate by code, p50/p99 latency, batch tokens, queue depth and job throughput."""
    joined = "\n".join(exprs())
    assert re.search(r"sum by \(code\) \(rate\(safety_requests_total", joined)
    for q in ("0.5", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(safety_request_duration_seconds_bucket" in joined
    assert "safety_batch_tokens_bucket" in joined
    assert "safety_queue_items" in joined and "safety_queue_tokens" in joined
    assert "safety_worker_items_total" in joined and "safety_worker_chunks_total" in joined
    assert "safety_worker_chunks_resent_total" in joined  # the broker lost a message: a worker died hard
