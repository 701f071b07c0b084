"""Every overlay renders and passes `kubernetes-validate --strict` (unknown fields fail) offline.

Owns: schema validation of the built-in Kubernetes kinds. Custom resources (KEDA's ScaledObject, the
Prometheus Operator's PrometheusRule and PodMonitor) have no schema in kubernetes-validate, which only WARNs
and exits 0 for them: they are split off here and checked in test_keda.py, test_alerts.py and
test_podmonitor.py, and any other schema-less object fails this test. Must not know: what the objects say.
"""

from __future__ import annotations

import pytest
import yaml

from tests.k8s.render import COMPOSITIONS, OVERLAYS, Rendered, kubernetes_validate, run

# The oldest release the manifests support (preStop `sleep` and gRPC probes need >= 1.30; 1.32 is the oldest
# still maintained upstream) and the newest the validator knows, which must be a current release.
KUBERNETES_VERSIONS = ("1.32", "1.37")
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}


def validate(objects: list[dict], version: str) -> tuple[int, str]:
    proc = run([kubernetes_validate(), "--strict", "-k", version, "-"], stdin=yaml.safe_dump_all(objects))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", [*OVERLAYS, *COMPOSITIONS])
def test_overlay_validates_strictly(rendered: dict[str, Rendered], name: str, version: str) -> None:
    builtin = [o for o in rendered[name].objects if (o["apiVersion"], o["kind"]) not in CUSTOM_KINDS]
    rc, out = validate(builtin, version)
    assert rc == 0, f"{name} against Kubernetes {version}:\n{out}"
    assert "WARN" not in out, f"{name}: objects with no schema (add a schema test for them):\n{out}"
    passed = [line for line in out.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(builtin), f"{name}: {len(builtin)} objects, {len(passed)} validated:\n{out}"


def test_newest_version_is_current() -> None:
    from kubernetes_validate.utils import latest_version
    from packaging.version import Version

    assert Version(latest_version()) >= Version(KUBERNETES_VERSIONS[-1]), "validator lacks the newest version"


def test_strict_mode_rejects_unknown_fields(rendered: dict[str, Rendered]) -> None:
    """The validator really is strict: a misspelled probe field in a rendered Deployment fails."""
    deployment = rendered["cpu"].get("Deployment", "safety-grpc")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    broken = {**container, "readinessProbe": {**container["readinessProbe"], "periodSecond": 5}}
    spec = {**deployment["spec"]["template"]["spec"], "containers": [broken]}
    bad = {
        **deployment,
        "spec": {**deployment["spec"], "template": {**deployment["spec"]["template"], "spec": spec}},
    }
    rc, out = validate([bad], KUBERNETES_VERSIONS[-1])
    assert rc != 0 and "periodSecond" in out, out
