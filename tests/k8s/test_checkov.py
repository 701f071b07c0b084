"""checkov's Kubernetes policies over every rendered overlay; accepted findings: k8s/checkov-skips.yaml.

Owns: running checkov offline (`--skip-download`) from its own virtualenv (its pins, e.g. packaging<24,
clash with the project's; `make checkov` creates `.cache/checkov-venv`) and matching its findings against
the reviewed skip list, both ways. Must not know: schemas or the service's contract.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.render import K8S, Rendered, checkov, run

SKIPS = yaml.safe_load((K8S / "checkov-skips.yaml").read_text())["skips"]


@pytest.fixture(scope="module")
def report(rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("checkov")
    for name, r in rendered.items():
        (out / f"{name.replace('+', '_')}.yaml").write_text(r.text)
    proc = run(
        [checkov(), "--framework", "kubernetes", "--skip-download", "--quiet", "--compact", "-o", "json",
         "-d", str(out)],
        timeout=300,
    )  # fmt: skip
    assert proc.returncode in (0, 1), (
        f"checkov failed to run (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    data = json.loads(proc.stdout)
    (data,) = data if isinstance(data, list) else [data]
    assert data["check_type"] == "kubernetes"
    # checkov also checks each workload's pod template as a Pod of its own.
    data["_objects"] = sum(len(r.objects) + len(list(r.workloads())) for r in rendered.values())
    return data


def _key(resource: str) -> tuple[str, str]:
    kind, _namespace, name = resource.split(".", 2)  # checkov names them Kind.namespace.name
    return kind, name


def _matches(skip: dict[str, Any], finding: dict[str, Any]) -> bool:
    kind, name = _key(finding["resource"])
    overlay = Path(finding["file_path"]).stem  # the report fixture writes each overlay to NAME.yaml
    return (
        skip["id"] == finding["check_id"]
        and ("*" in skip["resources"] or f"{kind}/{name}" in skip["resources"])
        and ("overlays" not in skip or overlay in {o.replace("+", "_") for o in skip["overlays"]})
    )


def test_checkov_read_every_object(report: dict[str, Any]) -> None:
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] == report["_objects"], "checkov did not see every rendered object"
    assert summary["passed"] > 0


def test_every_finding_is_a_reviewed_skip(report: dict[str, Any]) -> None:
    unreviewed = [
        f"{f['check_id']} {f['check_name']}: {f['resource']} ({Path(f['file_path']).name})"
        for f in report["results"]["failed_checks"]
        if not any(_matches(s, f) for s in SKIPS)
    ]
    assert not unreviewed, "fix these, or list them with a reason in k8s/checkov-skips.yaml:\n" + "\n".join(
        unreviewed
    )


def test_every_skip_is_justified_and_still_needed(report: dict[str, Any]) -> None:
    failed = report["results"]["failed_checks"]
    for skip in SKIPS:
        assert len(skip["reason"].split()) >= 10, f"{skip['id']}: say why it is accepted"
        assert any(_matches(skip, f) for f in failed), (
            f"{skip['id']} {skip['resources']} no longer fires: remove it"
        )
        for resource in skip["resources"]:
            if resource != "*":
                assert any(_matches({**skip, "resources": [resource]}, f) for f in failed), (
                    f"{skip['id']}: {resource}"
                )
        for overlay in skip.get("overlays", []):
            assert any(_matches({**skip, "overlays": [overlay]}, f) for f in failed), (
                f"{skip['id']}: {overlay}"
            )
