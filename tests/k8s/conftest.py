"""Session fixtures of the Kubernetes checks: the rendered overlays (see render.py).

Owns: rendering once per session. Must not know: what the manifests should say.
"""

from __future__ import annotations

import pytest

from tests.k8s.render import Rendered, render_all


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    """Every overlay and composition, rendered once per session, keyed by name."""
    return render_all(tmp_path_factory.mktemp("compose"))
