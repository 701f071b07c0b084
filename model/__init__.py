"""safety-classifier's engine: a ModernBERT sequence classifier on packed token streams.

Public API: `load_classifier`, `Classifier`, `Item`, `Result`, `Limits` (see docs/engine-api.md).
Knows nothing of gRPC, Celery or Redis.
"""

from model.classifier import Classifier, Encoded, Item, Limits, Result, load_classifier

__all__ = ["Classifier", "Encoded", "Item", "Limits", "Result", "load_classifier"]
