"""The prometheus-rules component's PrometheusRule, and the metrics it and the Grafana dashboard query,
checked against the /metrics of a real server and a real worker exporter.

Owns: the rule's schema (strict, prometheusrule.schema.json: kubernetes-validate has none for this custom
resource), what every alert carries, and the live cross-check: each metric name a rule or a panel names is
exported by a running `safety serve` (after Classify and ClassifyStream calls) or a worker's exporter, each
`method` label value they filter on is one the running server really reports, and every series a rule or a
panel selects (with the label values its matchers name) is already in the first scrape of a fresh server
and a fresh `safety worker`, before any traffic: increase() and rate() take a series' first sample as the
baseline, so an event that creates its series is never seen. (The pod alerts' kube_* series are
kube-state-metrics', not ours: test_promtool.py checks their scenarios against the labels it exports.)
Must not know: Prometheus beyond the rule file's shape and its selector syntax.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s.test_dashboard import exprs as dashboard_exprs
from tests.prometheus import metrics_text

SCHEMA = json.loads((Path(__file__).parent / "prometheusrule.schema.json").read_text())
NAMES = re.compile(r"\b((?:safety|process|python)_[a-z0-9_]+)\b")
METHOD = re.compile(r'method\s*(=~|=)\s*"([^"]+)"')
SELECTOR = re.compile(r"\b((?:safety|process|python)_[a-z0-9_]+)\b\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
SCRAPE_LABELS = {"namespace"}  # attached by the scrape, not exported: the queries filter on it


def alerts(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def all_exprs(rule: dict[str, Any]) -> list[str]:
    return [a["expr"] for a in alerts(rule)] + dashboard_exprs()


def test_rule_matches_schema(rule: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(rule)


@pytest.mark.parametrize(("field", "value"), [("for", "ten minutes"), ("expresion", "up"), ("expr", None)])
def test_schema_rejects_wrong_shapes(rule: dict[str, Any], field: str, value: Any) -> None:
    bad = json.loads(json.dumps(rule))
    bad["spec"]["groups"][0]["rules"][0][field] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(bad)


def test_every_alert_is_named_graded_and_explained(rule: dict[str, Any]) -> None:
    names = [a["alert"] for a in alerts(rule)]
    assert len(names) == len(set(names)), names
    for a in alerts(rule):
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        e = a["expr"]
        assert e.count("(") == e.count(")") and e.count("{") == e.count("}"), a["alert"]
    covered = "\n".join(a["expr"] for a in alerts(rule))
    for metric in ("safety_requests_total", "safety_request_duration_seconds_bucket", "safety_queue_items",
                   "safety_queue_tokens", "safety_device_failed", "safety_build_info",
                   'outcome="dead_lettered"', "safety_worker_chunks_resent_total",
                   'kube_pod_container_status_waiting_reason{reason="CrashLoopBackOff"',
                   "kube_pod_container_status_restarts_total"):  # fmt: skip
        assert metric in covered, metric


def test_queue_alert_compares_each_gauge_with_the_bound_the_pod_exports(rule: dict[str, Any]) -> None:
    """Both bounds admission applies, whatever they are set to (the token bound's default depends on the
    model and the device: no number in the rule could follow it)."""
    [queue] = [a for a in alerts(rule) if a["alert"] == "SafetyQueueNearBound"]
    assert "safety_queue_items / safety_queue_max_items" in queue["expr"]
    assert "safety_queue_tokens / safety_queue_max_tokens" in queue["expr"]
    assert re.search(r"\)\s*>\s*0\.8\s*$", queue["expr"])


# ---- live /metrics ----------------------------------------------------------------------------------------
def exported_names(text: str) -> set[str]:
    """Sample names a scrape yields, from the `# TYPE` lines (labelled families without samples yet too)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",),
                "summary": ("_count", "_sum", ""), "untyped": ("",), "info": ("_info",)}  # fmt: skip
    out = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out |= {name + s if not name.endswith(s) else name for s in suffixes[kind]}
        elif line and not line.startswith("#"):
            out.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return out


@pytest.fixture(scope="module")
def live_server(tiny_classifier: Any) -> Iterator[str]:
    """/metrics of a real server after a Classify call and a two-request ClassifyStream."""
    from service.client import SafetyClient
    from service.server import create_server
    from service.settings import ServeSettings
    from tests.service.helpers import LoopThread

    loop = LoopThread()
    settings = ServeSettings(address="127.0.0.1:0", metrics_address="127.0.0.1:0")
    app = loop.run(create_server(settings, tiny_classifier))
    try:
        loop.run(app.start())
        with SafetyClient(f"127.0.0.1:{app.port}", timeout=30) as client:
            client.classify(["one call"])
            assert len(list(client.classify_stream([["first"], ["second"]], timeout=30))) == 2
        yield metrics_text(app.metrics_port)
    finally:
        loop.run(app.drain(0))
        loop.close()


@pytest.fixture(scope="module")
def live_worker() -> str:
    import os

    from worker import metrics

    assert metrics.MULTIPROC_ENV not in os.environ
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        return metrics_text(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


def test_queries_name_metrics_a_running_server_or_worker_exports(
    rule: dict[str, Any], live_server: str, live_worker: str
) -> None:
    known = exported_names(live_server) | exported_names(live_worker)
    named = {m for e in all_exprs(rule) for m in NAMES.findall(e)}
    assert named, "no metric in any query"
    assert named <= known, f"queries name metrics no live /metrics has: {sorted(named - known)}"


def test_method_filters_match_the_methods_a_running_server_reports(
    rule: dict[str, Any], live_server: str
) -> None:
    reported = set(re.findall(r'safety_requests_total\{[^}]*method="([^"]+)"', live_server))
    assert {"Classify", "ClassifyStream", "ClassifyStream.request"} <= reported, reported
    filters = [(op, value) for e in all_exprs(rule) for op, value in METHOD.findall(e)]
    assert filters, "no query filters on method"
    for op, value in filters:
        wanted = value.split("|") if op == "=~" else [value]
        for method in wanted:
            assert method in reported, f"method {method!r} in a query, the server reports {sorted(reported)}"
        # a filter picks classification calls only: never the stream as a whole, health checks or jobs
        assert not {"ClassifyStream", "Check", "Watch"} & set(wanted), value
    # the request-rate and error-ratio panels filter to the classification calls
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _panels()}
    for title in ("Request rate by status code", "Error ratio"):
        assert by_title[title].count("method=~") == by_title[title].count("safety_requests_total"), title


def _panels() -> list[dict[str, Any]]:
    from tests.k8s.test_dashboard import PANELS

    return PANELS


# ---- every selected series exists before the first event -----------------------------------------------
def selected(expr: str) -> list[tuple[str, dict[str, list[str]]]]:
    """(metric, {label: the values its `=` or `=~` matcher names}) for each selector of `expr`. A `=~`
    matcher must be a plain alternation of literal values (so the values are known); negative matchers
    select no particular series and are left out, like the labels the scrape attaches."""
    out = []
    for name, body in SELECTOR.findall(expr):
        wanted: dict[str, list[str]] = {}
        for label, op, value in MATCHER.findall(body or ""):
            if label in SCRAPE_LABELS or op in ("!=", "!~"):
                continue
            values = value.split("|") if op == "=~" else [value]
            assert all(re.fullmatch(r"[A-Za-z0-9_.]+", v) for v in values), f"not a list of values: {value}"
            wanted[label] = values
        out.append((name, wanted))
    return out


def series(text: str) -> list[tuple[str, dict[str, str]]]:
    """(sample name, labels) of every sample a scrape holds."""
    return [(s.name, s.labels) for family in text_string_to_metric_families(text) for s in family.samples]


def missing_at_start(exprs: list[str], scraped: list[tuple[str, dict[str, str]]]) -> list[str]:
    """The selections (metric and one combination of the label values matched) with no series at all."""
    missing = []
    for expr in exprs:
        for name, wanted in selected(expr):
            for values in itertools.product(*wanted.values()):
                labels = dict(zip(wanted, values, strict=True))
                if not any(n == name and labels.items() <= have.items() for n, have in scraped):
                    missing.append(f"{name}{labels}")
    return sorted(set(missing))


def test_selectors_are_understood() -> None:
    """The parsing the check below relies on, on a query of each shape the rules use."""
    expr = (
        'sum(rate(safety_requests_total{namespace="$namespace", method=~"Classify|ClassifyStream.request", '
        'code!="OK"}[5m])) / sum(rate(safety_worker_chunks_resent_total[5m]))'
    )
    assert selected(expr) == [
        ("safety_requests_total", {"method": ["Classify", "ClassifyStream.request"]}),
        ("safety_worker_chunks_resent_total", {}),
    ]
    scraped = [("safety_requests_total", {"method": "Classify", "code": "OK"})]
    assert missing_at_start([expr], scraped) == [
        "safety_requests_total{'method': 'ClassifyStream.request'}",
        "safety_worker_chunks_resent_total{}",
    ]
    with pytest.raises(AssertionError, match="not a list of values"):
        selected('safety_requests_total{code=~"UN.*"}')


@pytest.fixture(scope="module")
def fresh_server(tiny_classifier: Any) -> Iterator[str]:
    """The first /metrics of a real server that has loaded its model and taken no call."""
    from service.server import create_server
    from service.settings import ServeSettings
    from tests.service.helpers import LoopThread

    loop = LoopThread()
    settings = ServeSettings(address="127.0.0.1:0", metrics_address="127.0.0.1:0")
    app = loop.run(create_server(settings, tiny_classifier))
    try:
        loop.run(app.start())
        yield metrics_text(app.metrics_port)
    finally:
        loop.run(app.drain(0))
        loop.close()


@pytest.fixture(scope="module")
def fresh_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The /metrics of a real `safety worker` (prefork, as on CPU: its counts go through the multiprocess
    files) once it is ready for chunks, before any: its own Redis, no job submitted."""
    from tests.worker.harness import RedisServer, Worker, free_port, poll, worker_env

    tmp = tmp_path_factory.mktemp("fresh-worker")
    redis = RedisServer(tmp / "redis").start()
    port = free_port()
    env = {**worker_env(redis.url, tiny_model_dir, worker_metrics_port=port), "TMPDIR": str(tmp)}
    worker = Worker(env, tmp / "worker.log", pool="prefork")
    try:
        poll(lambda: " ready." in worker.text(), timeout=60, what=f"the worker ready: {worker.log}")
        yield metrics_text(port)
    finally:
        worker.stop()
        redis.kill()


def test_every_selected_series_exists_before_any_traffic(
    rule: dict[str, Any], fresh_server: str, fresh_worker: str
) -> None:
    """A series that appears only with its first event starts at that event's count, and increase()/rate()
    take it as the baseline: SafetyDeviceFailed (whose replica exits right after its drops) would never
    fire, and the first dead-lettered chunk or error would be missed. Every alert's and panel's selection
    must already exist, at 0, in the first scrape of a fresh server and worker."""
    scraped = series(fresh_server) + series(fresh_worker)
    for _, labels in scraped:
        assert "namespace" not in labels  # the scrape attaches it; the selection check leaves it out
    missing = missing_at_start(all_exprs(rule), scraped)
    assert not missing, f"selected by a rule or panel, absent until its first event: {missing}"
