"""The prometheus-rules component's alerts and the Grafana dashboard's queries through promtool: Prometheus'
own PromQL parser and rule evaluator (Debian's 2.42, `make promtool`), offline.

Owns: the rendered PrometheusRule's groups written as a Prometheus rule file; `promtool check rules` on it
and on every dashboard query (Grafana's variables substituted, each wrapped as a recording rule); `promtool
test rules` on the alert scenarios in alerts.test.yaml, and the checks that keep those scenarios honest:
every alert has one where it fires and one where it must not, and their input series are the ones the
exporters emit, with the labels a scrape attaches. Must not know: what the alerts should say or when they
should fire (alerts.test.yaml holds that), nor Grafana beyond its variable syntax.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import Metrics
from tests.k8s.render import promtool, run
from tests.k8s.test_alerts import alerts
from tests.k8s.test_dashboard import DASHBOARD
from tests.k8s.test_dashboard import exprs as dashboard_exprs
from worker.metrics import Metrics as WorkerMetrics

SCENARIOS = Path(__file__).parent / "alerts.test.yaml"
# Grafana's built-in variables the queries may use, as a range a dashboard would give them.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
# $name, ${name} or ${name:format}, [[name]] (never `$1`: a label_replace() reference, not a variable)
VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)(?::[^\]]*)?\]\]")
SCRAPE_LABELS = {"namespace", "pod", "job", "instance"}  # target labels a scrape of a pod attaches
SERIES = re.compile(r"([A-Za-z_:][\w:]*)\{(.*)\}")
LABEL = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
FOUND = re.compile(r"SUCCESS: (\d+) rules found")
FIXED = {"le", "code", "outcome"}  # labels whose every value the exporters give from the start
# The kube-state-metrics series the pod alerts read (its own labels: namespace and pod, which a scrape with
# honor_labels keeps, then these), as kube-state-metrics v2 exports them.
KUBE_STATE_METRICS = {
    "kube_pod_container_status_restarts_total": {"uid", "container"},
    "kube_pod_container_status_waiting_reason": {"uid", "container", "reason"},
}


def check_rules(path: Path, rules: list[dict[str, str]]) -> tuple[int, str]:
    """`promtool check rules` on one group of `rules` written to `path`: its exit status and its output."""
    path.write_text(yaml.safe_dump({"groups": [{"name": path.stem, "rules": rules}]}, sort_keys=False))
    proc = run([promtool(), "check", "rules", str(path)])
    return proc.returncode, proc.stdout + proc.stderr


def recording(exprs: list[str]) -> list[dict[str, str]]:
    return [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]


def rules_found(output: str) -> int:
    """The number of rules `promtool check rules` reports for its one file (-1: no report)."""
    found = FOUND.findall(output)
    return int(found[0]) if len(found) == 1 else -1


def rule_file() -> str:
    """The one rule file alerts.test.yaml names (resolved next to it)."""
    [name] = yaml.safe_load(SCENARIOS.read_text())["rule_files"]
    return name


# ---- the rules parse --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(rule: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding alerts.test.yaml and, under the name its `rule_files` gives, the rendered rule's
    groups as a Prometheus rule file."""
    out = tmp_path_factory.mktemp("promtool")
    (out / rule_file()).write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(SCENARIOS, out / SCENARIOS.name)
    return out


def test_promtool_parses_every_alert(rule: dict[str, Any], workdir: Path) -> None:
    proc = run([promtool(), "check", "rules", str(workdir / rule_file())])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert alerts(rule) and rules_found(proc.stdout) == len(alerts(rule)), proc.stdout


def grafana_values() -> dict[str, str]:
    """What each variable becomes: the dashboard's own variables their current value (the data-source
    variable picks a data source, never appears in a query, and is left out), Grafana's built-ins a range."""
    values = dict(GRAFANA_BUILTINS)
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] != "datasource":
            values[var["name"]] = var["current"]["value"]
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """`expr` with every Grafana variable replaced; KeyError for one `values` lacks."""

    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"unknown Grafana variable {match.group(0)!r} in {expr}")
        return values[name]

    return VARIABLE.sub(one, expr)


def test_substitution_replaces_grafana_variables_only() -> None:
    values = {"namespace": "safety", "__rate_interval": "1m"}
    expr = 'rate(x{namespace="$namespace", a="${namespace:raw}", b="[[namespace]]"}[$__rate_interval])'
    assert substitute(expr, values) == 'rate(x{namespace="safety", a="safety", b="safety"}[1m])'
    assert substitute('label_replace(x, "a", "$1", "b", "(.*)")', values).count("$1") == 1
    with pytest.raises(KeyError, match=r"\$cluster"):
        substitute('x{cluster="$cluster"}', values)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    exprs = [substitute(e, grafana_values()) for e in dashboard_exprs()]  # KeyError: an unknown variable
    assert exprs and not [e for e in exprs if "$" in e], exprs
    code, output = check_rules(tmp_path / "dashboard.yaml", recording(exprs))
    assert code == 0, output
    assert rules_found(output) == len(exprs), output


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(safety_requests_total[5m])",  # unbalanced parenthesis
        "rate(safety_requests_total)",  # rate() of an instant vector
        'rate(safety_requests_total{namespace="safety"}[$__rate_interval])',  # a variable left in
        "max by (pod) (safety_queue_items) > > 3276",
    ],
)
def test_promtool_rejects_a_broken_query(tmp_path: Path, expr: str) -> None:
    """The harness above can fail: one broken query among valid ones fails the whole file."""
    code, output = check_rules(tmp_path / "broken.yaml", recording(["sum(safety_queue_items)", expr]))
    assert code != 0 and "parse error" in output, output


# ---- the alert scenarios ----------------------------------------------------------------------------------
def test_alert_scenarios_pass(workdir: Path) -> None:
    """Each alert fires, with its labels and annotations, exactly where alerts.test.yaml says, and nowhere
    else it looks (the rule file beside it is the rendered one: promtool resolves it from the test file)."""
    proc = run([promtool(), "test", "rules", str(workdir / SCENARIOS.name)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout, proc.stdout


def scenarios() -> list[dict[str, Any]]:
    return yaml.safe_load(SCENARIOS.read_text())["tests"]


def coverage_gaps(tests: list[dict[str, Any]], names: set[str]) -> list[str]:
    """What keeps `tests` from covering the alerts `names`: a check of an alert the rules lack (promtool
    passes an expectation of silence for it), an alert no scenario sees fire, one none expects quiet."""
    fires: set[str] = set()
    quiet: set[str] = set()
    gaps = []
    for test in tests:
        for check in test["alert_rule_test"]:
            if check["alertname"] not in names:
                gaps.append(f"no such alert: {check['alertname']}")
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    gaps += [f"never fires: {n}" for n in sorted(names - fires)]
    gaps += [f"never quiet: {n}" for n in sorted(names - quiet)]
    return gaps


def exported() -> dict[str, list[dict[str, str]]]:
    """The label sets of every sample a fresh server (with its model loaded) and a worker export, by
    sample name, and those of the kube-state-metrics series the pod alerts read."""
    server = Metrics()
    server.serving("safety-modernbert-small", "cpu", "torch.float32")
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    for registry in (server.registry, WorkerMetrics().registry):
        for family in registry.collect():
            for sample in family.samples:
                out[sample.name].append(sample.labels)
    for name, labels in KUBE_STATE_METRICS.items():  # no value is checked: none is in FIXED
        out[name].append(dict.fromkeys(labels, ""))
    return out


def exported_as(series: str, known: dict[str, list[dict[str, str]]]) -> bool:
    """Whether `series` is a sample the exporters export (`known`) plus the scrape's target labels: a known
    name, the same label names, and for the labels whose values the exporters fix from the start
    (histogram bounds, status codes, chunk outcomes) one of theirs. `method` values other than the
    classification calls' appear only after such a call, and are not checked."""
    match = SERIES.fullmatch(series)
    if match is None or match.group(1) not in known:
        return False
    labels = dict(LABEL.findall(match.group(2)))
    own = {k: v for k, v in labels.items() if k not in SCRAPE_LABELS}
    samples = known[match.group(1)]
    if not SCRAPE_LABELS <= labels.keys() or own.keys() not in [s.keys() for s in samples]:
        return False
    return all(own[k] in {s[k] for s in samples} for k in own.keys() & FIXED)


def foreign_series(tests: list[dict[str, Any]], known: dict[str, list[dict[str, str]]]) -> list[str]:
    """The input series of `tests` the exporters would not give a scrape."""
    return [s["series"] for t in tests for s in t["input_series"] if not exported_as(s["series"], known)]


def test_every_alert_has_a_scenario_that_fires_and_one_that_must_not(rule: dict[str, Any]) -> None:
    assert coverage_gaps(scenarios(), {a["alert"] for a in alerts(rule)}) == []


def test_scenario_series_are_the_ones_the_exporters_emit() -> None:
    """A renamed metric or label would leave a scenario testing nothing: every input series is one the
    server or the worker exports, with the labels a scrape attaches."""
    assert foreign_series(scenarios(), exported()) == []


def test_the_scenario_checks_can_fail() -> None:
    target = 'namespace="safety", pod="p", job="j", instance="i:9090"'
    bad = [
        f'safety_request_total{{{target}, method="Classify", code="OK"}}',  # no such metric
        'safety_requests_total{method="Classify", code="OK"}',  # no scrape labels
        f'safety_requests_total{{{target}, method="Classify"}}',  # a label short
        f'safety_request_duration_seconds_bucket{{{target}, method="Classify", le="1"}}',  # not "1.0"
        f'safety_worker_chunks_total{{{target}, outcome="failed"}}',  # not a chunk outcome
    ]
    good = [f'safety_requests_total{{{target}, method="SubmitJob", code="UNAVAILABLE"}}']
    tests = [
        {
            "input_series": [{"series": s, "values": "0"} for s in bad + good],
            "alert_rule_test": [
                {"alertname": "SafetyA", "exp_alerts": [{"exp_labels": {}}]},
                {"alertname": "SafetyTypo", "exp_alerts": []},
            ],
        }
    ]
    assert foreign_series(tests, exported()) == bad
    assert coverage_gaps(tests, {"SafetyA", "SafetyB"}) == [
        "no such alert: SafetyTypo",
        "never fires: SafetyB",
        "never quiet: SafetyA",
        "never quiet: SafetyB",
    ]
