"""Session fixtures of the Kubernetes checks: the rendered overlays (see render.py), and the rendered
PrometheusRule that test_alerts.py and test_promtool.py check.

Owns: rendering once per session. Must not know: what the manifests should say.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.k8s.render import Rendered, render_all


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    """Every overlay and composition, rendered once per session, keyed by name."""
    return render_all(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="session")
def rule(rendered: dict[str, Rendered]) -> dict[str, Any]:
    """The prometheus-rules component's PrometheusRule, rendered on top of the CPU overlay."""
    return rendered["cpu+prometheus-rules"].get("PrometheusRule", "safety-classifier")
