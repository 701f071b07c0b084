"""The pod-monitor component's PodMonitor: its schema (strict, podmonitor.schema.json) and what it scrapes.

Owns: the custom resource kubernetes-validate cannot check, and its contract with the Deployments: it selects
the pods of safety-grpc and safety-worker and nothing else, scrapes the container port both name `metrics`
on the path their scrape annotations give, in its own namespace, and more often than the drain grace (a
replica whose device failed waits that long for the scrape that reads `safety_device_failed`). Must not
know: what the metrics are (test_alerts.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.k8s.render import Rendered
from worker.settings import WorkerSettings

SCHEMA = json.loads((Path(__file__).parent / "podmonitor.schema.json").read_text())
COMPOSITION = "gpu+pod-monitor"
SCRAPED = {"safety-grpc", "safety-worker"}


@pytest.fixture(scope="module")
def composed(rendered: dict[str, Rendered]) -> Rendered:
    return rendered[COMPOSITION]


@pytest.fixture(scope="module")
def monitor(composed: Rendered) -> dict[str, Any]:
    return composed.get("PodMonitor", "safety-classifier")


def seconds(duration: str) -> float:
    """A Prometheus duration of one unit (`15s`, `1m`) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    unit = "ms" if duration.endswith("ms") else duration[-1]
    return float(duration[: -len(unit)]) * units[unit]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes' label-selector semantics: every matchLabels pair and every matchExpressions term."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for term in selector.get("matchExpressions", []):
        key, op, values = term["key"], term["operator"], term.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_podmonitor_matches_schema(monitor: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(monitor)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "podMetricsEndpoints", 0, "prot"), "metrics"),  # a misspelt field
        (("spec", "podMetricsEndpoints", 0, "interval"), "fifteen seconds"),
        (("spec", "selector", "matchExpressions", 0, "operator"), "in"),
        (("spec", "selectr"), {}),
    ],
)
def test_schema_rejects_wrong_shapes(monitor: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    bad = json.loads(json.dumps(monitor))
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(bad)


def test_selects_the_grpc_and_worker_pods_only(composed: Rendered, monitor: dict[str, Any]) -> None:
    spec = monitor["spec"]
    assert spec.get("namespaceSelector", {}) in ({}, {"matchNames": [monitor["metadata"]["namespace"]]}), (
        "the monitor's own namespace: the Deployments are beside it"
    )
    picked = {
        w["metadata"]["name"]
        for w in composed.workloads()
        if selects(spec["selector"], w["spec"]["template"]["metadata"]["labels"])
    }
    assert picked == SCRAPED
    assert selects({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["2"]}]}, {"a": "1"})


def test_scrapes_the_metrics_port_and_path_the_pods_declare(
    composed: Rendered, monitor: dict[str, Any]
) -> None:
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for name in SCRAPED:
        template = composed.get("Deployment", name)["spec"]["template"]
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert endpoint["port"] in ports, f"{name}: no container port named {endpoint['port']!r}"
        annotations = template["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == ports[endpoint["port"]]
        assert endpoint.get("path", "/metrics") == annotations["prometheus.io/path"]


def test_scrapes_more_often_than_the_drain_grace(composed: Rendered, monitor: dict[str, Any]) -> None:
    """A `safety serve` whose device failed keeps /metrics up within its drain grace until a scrape reads
    `safety_device_failed` = 1 (docs/deploy.md): a scrape interval longer than the grace misses it."""
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    config = composed.config()
    grace = float(config.get("SAFETY_DRAIN_GRACE_S") or WorkerSettings().drain_grace_s)
    assert "interval" in endpoint, "the Prometheus default (often 30 s or 1 m) may exceed the drain grace"
    assert seconds(endpoint["interval"]) < grace


def test_the_monitor_is_ours(monitor: dict[str, Any]) -> None:
    assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "safety-classifier"
    assert monitor["metadata"]["namespace"] == "safety"
