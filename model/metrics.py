"""Classification metrics for multi-label scores: AUROC, precision/recall/F1, PR curves, threshold tuning.

Owns: pure numpy arithmetic on (scores, 0/1 targets) arrays, shared by `safety train` (validation, model
selection, thresholds.json) and `safety eval`, and the 0/1 target matrix both build from label lists. Must not
know: models, tokenizers, files, plotting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from model.errors import InvalidInputError

THRESHOLD_RANGE = (0.05, 0.95)  # tuned thresholds are clipped to this range


def label_matrix(label_lists: Sequence[Sequence[str]], labels: Sequence[str], source: str) -> np.ndarray:
    """(n, L) float32 0/1 targets in `labels` order; an unknown label is an `InvalidInputError` naming the
    source and the item."""
    index = {label: j for j, label in enumerate(labels)}
    y = np.zeros((len(label_lists), len(labels)), dtype=np.float32)
    for i, item_labels in enumerate(label_lists):
        for label in item_labels:
            if label not in index:
                raise InvalidInputError(
                    f"unknown label {label!r}; the model's labels are {list(labels)}",
                    field=f"{source}: item {i} labels",
                )
            y[i, index[label]] = 1.0
    return y


def auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    n_pos = int(targets.sum())
    n_neg = len(targets) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(sorted_scores):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[targets].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass
class Counts:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    def to_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = dict(asdict(self))
        d.update(precision=self.precision, recall=self.recall, f1=self.f1, fpr=self.fpr)
        return d


def counts(predicted: np.ndarray, targets: np.ndarray) -> Counts:
    p = np.asarray(predicted).astype(bool)
    t = np.asarray(targets).astype(bool)
    return Counts(
        tp=int((p & t).sum()), fp=int((p & ~t).sum()), fn=int((~p & t).sum()), tn=int((~p & ~t).sum())
    )


def pr_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at every distinct score (descending thresholds: flag if >= t)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each run of equal scores
    tp, fp, thresholds = tp[last], fp[last], s[last]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(int(targets.sum()), 1)
    return precision, recall, thresholds


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the step PR curve (sum of precision x recall increments); None without positives."""
    if not np.asarray(targets).astype(bool).any():
        return None
    precision, recall, _ = pr_curve(scores, targets)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def tune_threshold(
    scores: np.ndarray, targets: np.ndarray, min_precision: float, default: float = 0.5
) -> float:
    """The threshold maximising F1 among those with precision >= min_precision (ties: the higher threshold);
    if none reaches that precision, the one maximising F1. Clipped to THRESHOLD_RANGE. `default` when the
    split has no positive or no negative for the label."""
    targets = np.asarray(targets).astype(bool)
    if targets.all() or not targets.any():
        return default
    precision, recall, thresholds = pr_curve(scores, targets)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    ok = precision >= min_precision
    candidates = np.nonzero(ok)[0] if ok.any() else np.arange(len(thresholds))
    best = candidates[np.argmax(f1[candidates])]  # first max = the highest threshold among ties
    # Put the threshold halfway to the next lower score so tiny score shifts do not flip the decision.
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else thresholds[best]
    value = (thresholds[best] + lower) / 2.0
    lo, hi = THRESHOLD_RANGE
    return float(min(max(value, lo), hi))


def label_report(
    probs: np.ndarray, targets: np.ndarray, labels: Sequence[str], thresholds: dict[str, float]
) -> dict[str, dict]:
    """Per label: support, AUROC, average precision and the counts/precision/recall/F1 at its threshold."""
    out = {}
    for j, label in enumerate(labels):
        c = counts(probs[:, j] >= thresholds[label], targets[:, j])
        out[label] = {
            "support": int(targets[:, j].sum()),
            "auroc": auroc(probs[:, j], targets[:, j]),
            "average_precision": average_precision(probs[:, j], targets[:, j]),
            "threshold": thresholds[label],
            **c.to_dict(),
        }
    return out


def macro(report: dict[str, dict], key: str) -> float | None:
    """Mean of `key` over labels where it is defined (AUROC needs both classes; F1 needs a positive)."""
    values = [r[key] for r in report.values() if r[key] is not None and (key != "f1" or r["support"] > 0)]
    return float(np.mean(values)) if values else None
