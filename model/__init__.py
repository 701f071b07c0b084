"""safety-classifier's engine: a ModernBERT sequence classifier on packed token streams.

Public API: `load_classifier`, `Classifier`, `Item`, `Result`, `Limits` (see docs/engine-api.md).
Knows nothing of gRPC, Celery or Redis. The names load lazily, so torch-free modules (`model.errors`,
`model.planner`, `model.windows`) can be imported — by the job client, say — without importing torch.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.classifier import Classifier, Encoded, Item, Limits, Result, Rows, load_classifier

__all__ = ["Classifier", "Encoded", "Item", "Limits", "Result", "Rows", "load_classifier"]


@functools.cache
def package_version() -> str:
    """The installed safety-classifier's version, for the build-info metrics ("unknown" in a source tree that
    was never installed)."""
    try:
        return importlib.metadata.version("safety-classifier")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from model import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
