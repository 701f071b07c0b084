"""`safety eval`: measure a checkpoint on labelled JSONL exactly as it is served.

Owns: reading evaluation files — items `{text, role?, context?, labels: [...]}` and response pairs
`{prompt, harmful_response, refusal, labels}` (each pair becomes two responses to the prompt) — scoring them
with `Classifier.classify` at the model's thresholds, and the report: per-label AUROC, average precision,
precision/recall/F1; an item-level confusion summary (flagged vs labelled harmful, overall and per role);
pair ordering (harmful answer above refusal); the misses; `metrics.json`, `predictions.jsonl` and a
precision-recall plot (`pr_curve.png`, matplotlib Agg). Must not know: training, gRPC, Celery.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model import metrics
from model.classifier import Classifier
from model.cliargs import add_threshold_option, parse_device, parse_dtype
from model.errors import InvalidInputError
from model.jsonl import read_jsonl

MAX_LISTED = 25  # misses and false positives listed in metrics.json


@dataclass
class Entry:
    item: dict  # {text, role, context?} as classify takes it
    labels: tuple[str, ...]
    pair: int | None = None  # index of the response pair it came from
    kind: str = "item"  # "item" | "harmful_response" | "refusal"


@dataclass
class Evaluation:
    metrics: dict
    probs: np.ndarray  # (n, L)
    targets: np.ndarray  # (n, L)
    entries: list[Entry]
    flagged: np.ndarray  # (n,) bool


def read_entries(path: Path) -> list[Entry]:
    out: list[Entry] = []
    pairs = 0
    for where, obj in read_jsonl(path):
        labels = obj.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidInputError("must be a list of label names ([] = benign)", field=f"{where}.labels")
        if "harmful_response" in obj:
            for key in ("prompt", "harmful_response", "refusal"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise InvalidInputError("must be a non-empty string", field=f"{where}.{key}")
            if not labels:
                raise InvalidInputError(
                    "a response pair needs the harmful answer's labels", field=f"{where}.labels"
                )
            ctx = obj["prompt"]
            out.append(
                Entry(
                    {"text": obj["harmful_response"], "role": "response", "context": ctx},
                    tuple(labels),
                    pairs,
                    "harmful_response",
                )
            )
            out.append(
                Entry({"text": obj["refusal"], "role": "response", "context": ctx}, (), pairs, "refusal")
            )
            pairs += 1
            continue
        if "text" not in obj:
            raise InvalidInputError("is required", field=f"{where}.text")
        item = {k: obj[k] for k in ("text", "role", "context") if obj.get(k) is not None}
        out.append(Entry(item, tuple(labels)))
    if not out:
        raise InvalidInputError("has no items", field=str(path))
    return out


def evaluate(
    clf: Classifier,
    entries: Sequence[Entry],
    thresholds: Mapping[str, float] | None = None,
    source: str = "<data>",
) -> Evaluation:
    labels = clf.labels
    y = metrics.label_matrix([e.labels for e in entries], labels, source)
    th = clf.resolve_thresholds(thresholds)
    results = clf.classify([e.item for e in entries], thresholds=th)
    probs = np.array([[r.scores[label] for label in labels] for r in results], dtype=np.float64)
    flagged = np.array([r.flagged for r in results])
    harmful = y.any(axis=1)
    report = metrics.label_report(probs, y, labels, th)
    top = probs.max(axis=1)
    m: dict[str, Any] = {
        "model": clf.name,
        "data": source,
        "items": len(entries),
        "harmful_items": int(harmful.sum()),
        "benign_items": int((~harmful).sum()),
        "thresholds": th,
        "labels": report,
        "macro": {
            k: metrics.macro(report, k) for k in ("auroc", "average_precision", "precision", "recall", "f1")
        },
        "confusion": metrics.counts(flagged, harmful).to_dict(),
        "any_label_auroc": metrics.auroc(top, harmful),
        "by_role": {},
    }
    roles = np.array([e.item.get("role") or "prompt" for e in entries])
    for role in sorted(set(roles)):
        sel = roles == role
        m["by_role"][role] = metrics.counts(flagged[sel], harmful[sel]).to_dict()
    pair_ids = sorted({e.pair for e in entries if e.pair is not None})
    if pair_ids:
        where = {(e.pair, e.kind): i for i, e in enumerate(entries) if e.pair is not None}
        failures = []
        higher = refusals_flagged = harmful_flagged = 0
        for p in pair_ids:
            h, r = where[(p, "harmful_response")], where[(p, "refusal")]
            higher += bool(top[h] > top[r])
            refusals_flagged += bool(flagged[r])
            harmful_flagged += bool(flagged[h])
            if not top[h] > top[r] or flagged[r]:
                failures.append(
                    {
                        "context": entries[h].item["context"],
                        "harmful_score": round(float(top[h]), 4),
                        "refusal_score": round(float(top[r]), 4),
                        "refusal_flagged": bool(flagged[r]),
                    }
                )
        m["pairs"] = {
            "count": len(pair_ids),
            "harmful_higher": higher,
            "refusals_flagged": refusals_flagged,
            "harmful_flagged": harmful_flagged,
            "failures": failures,
        }
    m["false_negatives"] = _listed(entries, results, harmful & ~flagged, top)
    m["false_positives"] = _listed(entries, results, ~harmful & flagged, top)
    return Evaluation(m, probs, y, list(entries), flagged)


def _listed(
    entries: Sequence[Entry], results: Sequence[Any], mask: np.ndarray, top: np.ndarray
) -> list[dict]:
    out = []
    for i in np.nonzero(mask)[0][:MAX_LISTED]:
        e, r = entries[i], results[i]
        out.append(
            {
                "text": e.item["text"][:200],
                "role": e.item.get("role") or "prompt",
                "labels": list(e.labels),
                "max_score": round(float(top[i]), 4),
                "flagged_labels": r.flagged_labels,
            }
        )
    return out


def evaluate_file(clf: Classifier, path: Path, thresholds: Mapping[str, float] | None = None) -> dict:
    return evaluate(clf, read_entries(path), thresholds, source=str(path)).metrics


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------


def plot_pr(ev: Evaluation, labels: Sequence[str], path: Path, title: str) -> None:
    """Precision-recall curves per label (with its operating point) and for the item verdict (max score)."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidInputError(
            "matplotlib is needed for the plot: pip install 'safety-classifier[train]'", field="--out"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    th = ev.metrics["thresholds"]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    curves = [(label, ev.probs[:, j], ev.targets[:, j], th[label]) for j, label in enumerate(labels)]
    curves.append(("any label (max score)", ev.probs.max(axis=1), ev.targets.any(axis=1), None))
    for name, scores, t, thr in curves:
        if not np.asarray(t).any():
            continue
        p, r, _ = metrics.pr_curve(scores, t)
        ap = metrics.average_precision(scores, t)
        style = {"color": "black", "linewidth": 2.2} if thr is None else {"linewidth": 1.3}
        (line,) = ax.step(np.r_[0.0, r], np.r_[p[0], p], where="post", label=f"{name} (AP {ap:.2f})", **style)
        if thr is not None:
            c = metrics.counts(scores >= thr, t)
            ax.plot([c.recall], [c.precision], "o", color=line.get_color(), markersize=5)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.03)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left")
    else:  # a benign-only set has no precision-recall curve: say so on the plot
        ax.text(0.5, 0.5, "no harmful items in this set", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(ev: Evaluation, labels: Sequence[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "metrics.json", out / "predictions.jsonl", out / "pr_curve.png"]
    paths[0].write_text(json.dumps(ev.metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with paths[1].open("w", encoding="utf-8") as f:
        for e, p, flag in zip(ev.entries, ev.probs, ev.flagged, strict=True):
            row = {
                **e.item,
                "labels": list(e.labels),
                "flagged": bool(flag),
                "scores": {label: round(float(v), 5) for label, v in zip(labels, p, strict=True)},
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot_pr(ev, labels, paths[2], f"{ev.metrics['model']} on {Path(ev.metrics['data']).name}")
    return paths


def one_line(path: str, m: dict) -> str:
    c = m["confusion"]
    line = f"{path}: {m['items']} items"
    if c["tp"] + c["fn"]:
        line += f"; harmful flagged {c['tp']}/{c['tp'] + c['fn']} (recall {c['recall']:.3f})"
    if c["fp"] + c["tn"]:
        line += f"; benign flagged {c['fp']}/{c['fp'] + c['tn']} (FPR {c['fpr']:.3f})"
    if "pairs" in m:
        p = m["pairs"]
        line += (
            f"; pairs harmful>refusal {p['harmful_higher']}/{p['count']}, "
            f"refusals flagged {p['refusals_flagged']}"
        )
    return line


def summary_text(m: dict) -> str:
    lines = [one_line(m["data"], m), ""]
    head = f"{'label':<12} {'pos':>4} {'AUROC':>6} {'AP':>6} {'thr':>5} {'prec':>5} {'rec':>5} {'F1':>5}"
    lines.append(head)
    fmt = lambda x: "  –  " if x is None else f"{x:.3f}"  # noqa: E731
    for label, r in m["labels"].items():
        lines.append(
            f"{label:<12} {r['support']:>4} {fmt(r['auroc']):>6} {fmt(r['average_precision']):>6} "
            f"{r['threshold']:>5.2f} "
            f"{r['precision']:>5.2f} {r['recall']:>5.2f} {r['f1']:>5.2f}"
        )
    mac = m["macro"]
    lines.append(
        f"{'macro':<12} {'':>4} {fmt(mac['auroc']):>6} {fmt(mac['average_precision']):>6} {'':>5} "
        f"{fmt(mac['precision']):>5} "
        f"{fmt(mac['recall']):>5} {fmt(mac['f1']):>5}"
    )
    c = m["confusion"]
    lines += [
        "",
        f"items: TP {c['tp']}  FP {c['fp']}  FN {c['fn']}  TN {c['tn']}  precision {c['precision']:.3f}  "
        f"recall {c['recall']:.3f}  FPR {c['fpr']:.3f}  (any-label AUROC {fmt(m['any_label_auroc'])})",
    ]
    for role, rc in m["by_role"].items():
        lines.append(f"  {role}: TP {rc['tp']}  FP {rc['fp']}  FN {rc['fn']}  TN {rc['tn']}")
    return "\n".join(lines)


def eval_command(args: argparse.Namespace) -> int:
    from model import load_classifier

    clf = load_classifier(args.model, device=args.device, dtype=args.dtype, max_tokens=args.max_tokens)
    ev = evaluate(clf, read_entries(Path(args.data)), dict(args.threshold or []), source=args.data)
    print(summary_text(ev.metrics))
    if args.out:
        for p in write_outputs(ev, clf.labels, Path(args.out)):
            print(f"wrote {p}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on labelled JSONL (AUROC, P/R/F1, confusion, PR plot)",
        description="Scores items {text, role?, context?, labels} and response pairs {prompt, "
        "harmful_response, refusal, labels} with the model exactly as served, at its thresholds.",
    )
    p.add_argument(
        "--model",
        default=os.environ.get("SAFETY_MODEL") or None,
        help="checkpoint directory (default: $SAFETY_MODEL, else the bundled model)",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="labelled JSONL")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write metrics.json, predictions.jsonl, pr_curve.png"
    )
    add_threshold_option(p)
    p.add_argument("--device", default="auto", type=parse_device, help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default=None, type=parse_dtype, help="float32 | bfloat16 | float16")
    p.add_argument("--max-tokens", type=int, default=None, help="window size in tokens (default: model max)")
    p.set_defaults(func=eval_command)
