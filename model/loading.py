"""Loading Hugging Face ModernBERT checkpoints: config.json + safetensors (single or sharded).

Owns: reading tensors (safetensors only — there is no pickle path at all), the one key-remapping table
(headless `embeddings.*` exports gain the `model.` prefix; MLM `decoder.*` is dropped), building the network
on the meta device and loading it strictly with `assign=True`. A checkpoint without a classification head is
refused for inference and, only when `new_head=True` (training), given a fresh head that is reported.
Must not know: tokenizers, batching, serving.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.config import ModernBertConfig
from model.errors import CheckpointError
from model.modernbert import ModernBertForSequenceClassification

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HEAD_KEYS = ("head.dense.weight", "head.dense.bias", "head.norm.weight", "head.norm.bias")
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    kind: str = "classifier"  # "classifier" | "mlm" | "headless"
    dropped: list[str] = field(default_factory=list)  # keys in the file we do not use (e.g. decoder.bias)
    initialized: list[str] = field(default_factory=list)  # parameters created fresh (new head)


def read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All tensors of a checkpoint directory, from `model.safetensors` or a sharded index."""
    index_path = directory / INDEX
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
    elif (directory / SINGLE).exists():
        shards = [SINGLE]
    else:
        found = sorted(p.name for p in directory.glob("*")) if directory.is_dir() else []
        if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
            raise CheckpointError(
                f"{directory}: only safetensors weights are accepted (found pickle-based files {found}); "
                "convert them with `safetensors` first"
            )
        raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = directory / shard
        if not path.exists():
            raise CheckpointError(f"{path}: shard named in {INDEX} is missing")
        try:
            part = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
        if index_path.exists():
            expected = {k for k, v in weight_map.items() if v == shard}
            if set(part) != expected:
                raise CheckpointError(f"{path}: tensors differ from those the index assigns to it")
        tensors.update(part)
    return tensors, shards


def remap(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Bring any accepted layout to HF ModernBertForSequenceClassification's key names."""
    report = LoadReport()
    out: dict[str, torch.Tensor] = {}
    headless = not any(k.startswith("model.") for k in tensors)
    for key, t in tensors.items():
        if key.startswith("decoder."):
            report.dropped.append(key)
            report.kind = "mlm"
            continue
        if headless and key.startswith(("embeddings.", "layers.", "final_norm.")):
            key = "model." + key
        out[key] = t
    if headless:
        report.kind = "headless"
    return out, report


def init_head(model: ModernBertForSequenceClassification, state: dict[str, torch.Tensor], report: LoadReport):
    """Fresh parameters (HF's initialisation) for head/classifier keys the checkpoint lacks."""
    c = model.config
    std_out = 0.02 / math.sqrt(2.0 * c.num_hidden_layers)
    fresh = {
        "head.dense.weight": torch.nn.init.trunc_normal_(
            torch.empty(c.hidden_size, c.hidden_size), std=std_out, a=-2 * std_out, b=2 * std_out
        ),
        "head.dense.bias": torch.zeros(c.hidden_size),
        "head.norm.weight": torch.ones(c.hidden_size),
        "head.norm.bias": torch.zeros(c.hidden_size),
        "classifier.weight": torch.nn.init.trunc_normal_(
            torch.empty(c.num_labels, c.hidden_size), std=c.hidden_size**-0.5, a=-2 * c.hidden_size**-0.5,
            b=2 * c.hidden_size**-0.5,
        ),
        "classifier.bias": torch.zeros(c.num_labels),
    }  # fmt: skip
    wanted = model.state_dict().keys()
    for key, t in fresh.items():
        if key in wanted and key not in state:
            state[key] = t
            report.initialized.append(key)


def relabel(
    config: ModernBertConfig, labels: Sequence[str], state: dict[str, torch.Tensor], report: LoadReport
) -> ModernBertConfig:
    """A multi-label config over `labels`; drops a classifier trained for other labels from `state`."""
    id2label = dict(enumerate(labels))
    if config.labels != list(labels):
        for key in CLASSIFIER_KEYS:
            if key in state:
                del state[key]
                report.dropped.append(key)
    return replace(config, id2label=id2label, problem_type="multi_label_classification")


def load_model(
    directory: str | Path, *, new_head: bool = False, labels: Sequence[str] | None = None
) -> tuple[ModernBertForSequenceClassification, ModernBertConfig, LoadReport]:
    """Build the network on meta, load the checkpoint strictly, return it in fp32 on the CPU.

    `labels` (training only, needs `new_head=True`) re-labels the model as multi-label over these names;
    a classifier whose own labels differ (names, order or count) loses its `classifier.*` tensors, which are
    re-initialised and reported (`report.dropped`, `report.initialized`); head.dense/head.norm are kept."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = ModernBertConfig.from_json(directory / "config.json")
    tensors, shards = read_tensors(directory)
    state, report = remap(tensors)
    report.files = shards
    if labels is not None:
        if not new_head:
            raise ValueError("load_model: labels= is for training and needs new_head=True")
        config = relabel(config, labels, state, report)
    with torch.device("meta"):
        model = ModernBertForSequenceClassification(config)
    wanted = model.state_dict()
    missing_head = [k for k in (*HEAD_KEYS, *CLASSIFIER_KEYS) if k in wanted and k not in state]
    if missing_head:
        if not new_head:
            raise CheckpointError(
                f"{directory}: checkpoint has no classification head (missing {missing_head}); it is a "
                f"{report.kind} checkpoint — fine-tune it with `safety train` first"
            )
        init_head(model, state, report)
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: tensors do not match the config: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")  # fmt: skip
    for key, t in state.items():
        if tuple(t.shape) != tuple(wanted[key].shape):
            if key == "classifier.weight" or key == "classifier.bias":
                hint = f" (config has {config.num_labels} labels)"
            else:
                hint = ""
            raise CheckpointError(
                f"{directory}: tensor {key} has shape {tuple(t.shape)}, config expects "
                f"{tuple(wanted[key].shape)}{hint}"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    model.model.reset_rope("cpu")
    return model.eval(), config, report
