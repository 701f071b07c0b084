"""`safety train`: fine-tune a ModernBERT checkpoint, or train a small one from scratch, as a multi-label
content classifier, and write a servable Hugging Face-compatible directory.

Owns: reading labelled JSONL (`{text, role?, context?, labels: [...]}`), the seeded validation split, model
set-up (`--init DIR`: a checkpoint with a fresh head sized to the labels; `--config`: a preset or JSON
config with a byte-level BPE tokenizer trained on the corpus and HF's initialisation), encoding items exactly
as the classifier does at inference (`Classifier.encode`: a prompt alone, a response paired with its context
cut to `max_context_tokens`), the training loop (packed unpadded batches from `model.planner` under a token
budget, AdamW, linear warm-up then cosine/linear decay, multi-label BCE, bf16 autocast on CUDA), per-epoch
validation, best-checkpoint selection, threshold tuning and the files written (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, thresholds.json, train_metrics.json,
MODEL_CARD.md). Must not know: gRPC, Celery, environment variables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import metrics
from model.attention import Attention, pick_backend
from model.classifier import Classifier, Encoded, Item, Limits, check_limits
from model.cliargs import parse_device
from model.config import ModernBertConfig
from model.errors import CheckpointError, ConfigError, InvalidInputError
from model.items import Fields, check_item
from model.jsonl import read_jsonl
from model.loading import load_model
from model.modernbert import (
    ModernBertAttention,
    ModernBertEmbeddings,
    ModernBertForSequenceClassification,
    ModernBertMLP,
    ModernBertPredictionHead,
)
from model.packing import Packed, pack
from model.planner import plan_batches
from model.runner import resolve_device
from model.tokenizer import TextTokenizer, special_token_settings, train_tokenizer

log = logging.getLogger(__name__)

# The project's taxonomy, in logit order; other label names in user data follow in alphabetical order.
TAXONOMY = ("harassment", "hate", "sexual", "violence", "self_harm", "dangerous", "jailbreak")

# Architectures for `--config NAME`. `vocab_size` is the tokenizer's target size; the config gets the
# tokenizer's actual size rounded up to a multiple of 64.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        local_attention=16,
        max_position_embeddings=512,
        vocab_size=1024,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        local_attention=128,
        max_position_embeddings=512,
        vocab_size=4096,
    ),
}
SHARED_ARCH = dict(
    classifier_pooling="mean",
    global_attn_every_n_layers=3,
    global_rope_theta=160_000.0,
    local_rope_theta=10_000.0,
    hidden_activation="gelu",
    classifier_activation="gelu",
)
INITIALIZER_RANGE = 0.02
CUTOFF = 3.0  # HF's initializer_cutoff_factor default: truncate at +-3 std
SPLIT_GROUP_ITEMS = 2048  # batches are planned within shuffled groups of this many items (length bucketing)
DEFAULT_MIN_PRECISION = 0.9


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    item: Item
    labels: tuple[str, ...]
    source: str = ""


def read_rows(path: Path) -> list[Row]:
    """Labelled items from JSONL; a bad line raises InvalidInputError naming the file, line and field."""
    rows = []
    for where, obj in read_jsonl(path):
        text, role, context = obj.get("text"), obj.get("role") or "prompt", obj.get("context") or None
        labels = obj.get("labels")
        try:  # the item rules of every front end (model.items), reported at FILE:LINE
            check_item(Fields(text, role, context, None), 0)
        except InvalidInputError as e:
            raise InvalidInputError(e.reason, field=f"{where}.{e.field}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            raise InvalidInputError("must be a list of label names ([] = benign)", field=f"{where}.labels")
        source = obj.get("source") if isinstance(obj.get("source"), str) else ""
        rows.append(Row(Item(text=text, role=role, context=context), tuple(dict.fromkeys(labels)), source))
    if not rows:
        raise InvalidInputError("has no items", field=str(path))
    return rows


def default_labels(rows: Sequence[Row]) -> list[str]:
    """Labels present in the data: taxonomy order first, then other names alphabetically."""
    seen = {label for r in rows for label in r.labels}
    return [x for x in TAXONOMY if x in seen] + sorted(seen - set(TAXONOMY))


def targets(rows: Sequence[Row], labels: Sequence[str], path: str) -> np.ndarray:
    return metrics.label_matrix([r.labels for r in rows], labels, path)


def split_rows(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded group-aware split: a prompt and every response to it (same context) fall on the same side."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"must be in (0, 1), got {fraction}", field="--valid-fraction")
    train, valid = [], []
    for r in rows:
        group = " ".join((r.item.context if r.item.context else r.item.text).casefold().split())
        h = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
        (valid if h < fraction else train).append(r)
    if not train or not valid:
        raise InvalidInputError(
            f"splits {len(rows)} items into {len(train)} train / {len(valid)} valid; give --valid FILE",
            field="--valid-fraction",
        )
    return train, valid


# ---------------------------------------------------------------------------------------------------------
# model set-up
# ---------------------------------------------------------------------------------------------------------


def init_weights(model: ModernBertForSequenceClassification) -> None:
    """HF ModernBertPreTrainedModel._init_weights: truncated normal (+-3 std) with std 0.02 for embeddings
    and input projections, 0.02/sqrt(2 * layers) for output projections and head.dense, hidden**-0.5 for
    the classifier; zero biases; LayerNorm weight 1."""
    c = model.config
    std_out = INITIALIZER_RANGE / math.sqrt(2.0 * c.num_hidden_layers)

    def init(linear: torch.nn.Module, std: float) -> None:
        torch.nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-CUTOFF * std, b=CUTOFF * std)
        if getattr(linear, "bias", None) is not None:
            torch.nn.init.zeros_(linear.bias)

    for module in model.modules():
        if isinstance(module, ModernBertEmbeddings):
            init(module.tok_embeddings, INITIALIZER_RANGE)
        elif isinstance(module, ModernBertMLP):
            init(module.Wi, INITIALIZER_RANGE)
            init(module.Wo, std_out)
        elif isinstance(module, ModernBertAttention):
            init(module.Wqkv, INITIALIZER_RANGE)
            init(module.Wo, std_out)
        elif isinstance(module, ModernBertPredictionHead):
            init(module.dense, std_out)
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    init(model.classifier, c.hidden_size**-0.5)


def architecture(spec: str) -> dict[str, Any]:
    """A preset name or a JSON file of config.json keys (architecture only; ids and labels are ours)."""
    if spec in PRESETS:
        return {**SHARED_ARCH, **PRESETS[spec]}
    path = Path(spec)
    if not path.suffix == ".json":
        raise InvalidInputError(
            f"must be one of {sorted(PRESETS)} or a .json file, got {spec!r}", field="--config"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found", field="<file>", file=str(path)) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON ({e})", field="<file>", file=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("must be a JSON object", field="<file>", file=str(path))
    return {**SHARED_ARCH, **raw}


def scratch_model(
    spec: str, rows: Sequence[Row], labels: Sequence[str], vocab_size: int | None, seed: int
) -> tuple[ModernBertForSequenceClassification, TextTokenizer]:
    """A byte-level BPE tokenizer trained on the training texts and a freshly initialised network."""
    arch = architecture(spec)
    target = vocab_size or int(arch.pop("vocab_size", 8192))
    arch.pop("vocab_size", None)
    texts = [t for r in rows for t in (r.item.text, r.item.context) if t]
    tok = train_tokenizer(texts, vocab_size=target)
    ids = {
        name: tok.token_to_id(token)
        for name, token in (("pad_token_id", "[PAD]"), ("cls_token_id", "[CLS]"), ("sep_token_id", "[SEP]"))
    }
    raw = {
        **arch,
        **ids,
        "model_type": "modernbert",
        "vocab_size": -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64,
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "problem_type": "multi_label_classification",
    }
    config = ModernBertConfig.from_dict(raw, source=f"--config {spec}")
    torch.manual_seed(seed)
    model = ModernBertForSequenceClassification(config)
    init_weights(model)
    return model, TextTokenizer(tok, source="<trained>")


# ---------------------------------------------------------------------------------------------------------
# encoding and batching
# ---------------------------------------------------------------------------------------------------------


def encoder(config: ModernBertConfig, tokenizer: TextTokenizer, limits: Limits) -> Classifier:
    """A Classifier used only for `encode` (it needs the tokenizer and the limits, not a runner), so training
    and validation see exactly the token windows that inference builds."""
    check_limits(limits, config, tokenizer)
    return Classifier(
        config=config,
        tokenizer=tokenizer,
        runner=None,
        limits=limits,  # type: ignore[arg-type]
        thresholds={},
        path="<training>",
    )


def encode_rows(clf: Classifier, rows: Sequence[Row]) -> list[Encoded]:
    return clf.encode([r.item for r in rows])


def epoch_batches(
    lengths: Sequence[int], budget: int, max_sequences: int, padded: bool, rng: random.Random
) -> list[list[int]]:
    """Shuffle, plan length buckets within groups of SPLIT_GROUP_ITEMS items, then shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for g in range(0, len(order), SPLIT_GROUP_ITEMS):
        group = order[g : g + SPLIT_GROUP_ITEMS]
        for b in plan_batches([lengths[i] for i in group], budget, max_sequences, padded=padded):
            batches.append([group[i] for i in b])
    rng.shuffle(batches)
    return batches


def lr_lambda(total: int, warmup: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    epochs: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of all steps
    schedule: str = "cosine"  # "cosine" | "linear" decay after warm-up, to 0
    batch_tokens: int = 8192  # per step, priced as the kernel pays (padded on CPU SDPA)
    batch_sequences: int = 256
    max_tokens: int = 512  # training window (first window of each item unless windows == "all")
    max_context_tokens: int = 256
    windows: str = "first"  # "first" | "all"
    seed: int = 13
    max_steps: int | None = None
    grad_clip: float = 1.0
    min_precision: float = DEFAULT_MIN_PRECISION
    token_mask: float = 0.0  # share of content tokens replaced by [MASK] in each training step


@dataclass
class Trained:
    model: ModernBertForSequenceClassification
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    valid_probs: np.ndarray | None = None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


class Trainer:
    def __init__(
        self,
        model: ModernBertForSequenceClassification,
        tokenizer: TextTokenizer,
        recipe: Recipe,
        device: torch.device,
        backend: str | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model.to(device)
        self.model.model.reset_rope(device)
        self.config = model.config
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.device = device
        self.backend = pick_backend(device, backend)
        self.attn = Attention(self.backend, self.config.window)
        self.progress = progress
        self.autocast = device.type == "cuda"  # bf16 autocast on CUDA, fp32 on CPU
        c = self.config
        self.special_ids = {c.pad_token_id, c.cls_token_id, c.sep_token_id}
        mask_id = tokenizer.token_id("[MASK]")
        if recipe.token_mask > 0 and mask_id is None:
            raise InvalidInputError("the tokenizer has no [MASK] token", field="--token-mask")
        self.mask_id = mask_id if mask_id is not None else c.pad_token_id
        r = recipe
        self.train_limits = Limits(
            max_tokens=r.max_tokens,
            window_overlap=64,
            max_context_tokens=r.max_context_tokens,
            max_batch_tokens=r.batch_tokens,
            max_batch_sequences=r.batch_sequences,
        )
        # validation scores what `load_classifier(dir)` serves by default: windows of max_position_embeddings
        self.valid_limits = Limits(
            max_tokens=self.config.max_position_embeddings,
            max_context_tokens=r.max_context_tokens,
            max_batch_tokens=max(r.batch_tokens, self.config.max_position_embeddings),
            max_batch_sequences=r.batch_sequences,
        )

    # -- forward ------------------------------------------------------------------------------------------
    def logits(self, seqs: list[list[int]], gen: torch.Generator | None = None) -> torch.Tensor:
        batch = pack(seqs)
        if gen is not None and self.recipe.token_mask > 0:
            batch = self.mask_tokens(batch, gen)
        batch = batch.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(batch, self.attn).float()

    def mask_tokens(self, batch: Packed, gen: torch.Generator) -> Packed:
        """Augmentation: replace a random share of content tokens (never [CLS]/[SEP]/[PAD]) by [MASK], so
        the classifier cannot lean on any single word. Seeded; inference never masks."""
        ids = batch.input_ids
        keep = torch.tensor(sorted(self.special_ids), dtype=ids.dtype)
        hit = (torch.rand(ids.shape, generator=gen) < self.recipe.token_mask) & ~torch.isin(ids, keep)
        return replace(batch, input_ids=torch.where(hit, torch.full_like(ids, self.mask_id), ids))

    @torch.no_grad()
    def predict(self, encoded: Sequence[Encoded]) -> np.ndarray:
        """Probabilities (n, L): sigmoid of the max logit over each item's windows, as `classify` does."""
        self.model.eval()
        seqs = [w for e in encoded for w in e.windows]
        owner = np.repeat(np.arange(len(encoded)), [len(e.windows) for e in encoded])
        out = np.full((len(encoded), self.config.num_labels), -np.inf, dtype=np.float32)
        lim = self.valid_limits
        padded = self.backend == "sdpa"
        for b in plan_batches(
            [len(s) for s in seqs], lim.max_batch_tokens, lim.max_batch_sequences, padded=padded
        ):
            z = self.logits([seqs[i] for i in b]).cpu().numpy()
            np.maximum.at(out, owner[b], z)
        self.model.train()
        return 1.0 / (1.0 + np.exp(-out))

    # -- loop ---------------------------------------------------------------------------------------------
    def fit(
        self, train_rows: Sequence[Row], y_train: np.ndarray, valid_rows: Sequence[Row], y_valid: np.ndarray
    ) -> Trained:
        r, labels = self.recipe, self.config.labels
        enc_train = encode_rows(encoder(self.config, self.tokenizer, self.train_limits), train_rows)
        enc_valid = encode_rows(encoder(self.config, self.tokenizer, self.valid_limits), valid_rows)
        seqs, ys = [], []
        for e, y in zip(enc_train, y_train, strict=True):
            for w in e.windows if r.windows == "all" else e.windows[:1]:
                seqs.append(w)
                ys.append(y)
        y_seq = torch.from_numpy(np.stack(ys))
        lengths = [len(s) for s in seqs]
        padded = self.backend == "sdpa"
        plans = [
            epoch_batches(lengths, r.batch_tokens, r.batch_sequences, padded, random.Random(f"{r.seed}:{e}"))
            for e in range(r.epochs)
        ]
        total = sum(len(p) for p in plans)
        if r.max_steps is not None:
            total = min(total, r.max_steps)
        warmup = max(1, round(r.warmup * total))
        per_batch = len(seqs) / max(1, sum(len(p) for p in plans) / r.epochs)  # mean sequences per batch
        opt = torch.optim.AdamW(
            param_groups(self.model, r.weight_decay), lr=r.lr, betas=(0.9, 0.98), eps=1e-6
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, r.schedule))
        log.info(
            "training on %d sequences (%d tokens per epoch), %d steps, %d warm-up; valid %d items",
            len(seqs),
            sum(lengths),
            total,
            warmup,
            len(valid_rows),
        )
        out = Trained(self.model)
        best_key, best_state = None, None
        start = time.monotonic()
        gen = torch.Generator().manual_seed(r.seed)
        self.model.train()
        for epoch, plan in enumerate(plans, 1):
            if out.steps >= total:
                break
            plan = plan[: total - out.steps]
            bar = _bar(len(plan), f"epoch {epoch}/{r.epochs}", self.progress)
            loss_sum, n_seq, t0, tok0 = 0.0, 0, time.monotonic(), out.tokens
            for b in plan:
                z = self.logits([seqs[i] for i in b], gen)
                target = y_seq[b].to(self.device)
                # every sequence weighs the same whatever its batch's size: sum over sequences / mean count
                loss_items = F.binary_cross_entropy_with_logits(z, target, reduction="none").mean(dim=1)
                loss = loss_items.sum() / per_batch
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if r.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
                opt.step()
                sched.step()
                out.steps += 1
                out.tokens += sum(lengths[i] for i in b)
                loss_sum += float(loss_items.detach().sum())
                n_seq += len(b)
                bar.update(1)
                rate = (out.tokens - tok0) / max(1e-9, time.monotonic() - t0)
                bar.set_postfix(loss=f"{loss_sum / n_seq:.4f}", tok_s=f"{rate:.0f}", refresh=False)
            bar.close()
            probs = self.predict(enc_valid)
            th = {label: 0.5 for label in labels}
            rep = metrics.label_report(probs, y_valid, labels, th)
            val_loss = float(
                F.binary_cross_entropy(
                    torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7), torch.from_numpy(y_valid)
                )
            )
            entry = {
                "epoch": epoch,
                "steps": out.steps,
                "train_loss": round(loss_sum / max(1, n_seq), 5),
                "valid_loss": round(val_loss, 5),
                "valid_macro_auroc": _round(metrics.macro(rep, "auroc")),
                "valid_macro_f1_at_0.5": _round(metrics.macro(rep, "f1")),
                "valid_auroc": {k: _round(v["auroc"]) for k, v in rep.items()},
            }
            out.history.append(entry)
            key = selection_key(entry)
            improved = best_key is None or key > best_key
            if improved:
                best_key, out.best_epoch, out.valid_probs = key, epoch, probs
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            _say(
                f"epoch {epoch}: train loss {entry['train_loss']:.4f}, valid loss {val_loss:.4f}, "
                f"macro AUROC {entry['valid_macro_auroc']}, macro F1@0.5 {entry['valid_macro_f1_at_0.5']}"
                f"{' (best)' if improved else ''}",
                self.progress,
            )
        out.seconds = time.monotonic() - start
        assert best_state is not None
        self.model.load_state_dict(best_state)
        self.model.eval()
        return out


def selection_key(entry: dict) -> tuple[float, float]:
    """Model selection: the highest validation macro AUROC; lower validation loss breaks ties (and decides
    alone when no label has both classes in the validation split)."""
    auroc = entry["valid_macro_auroc"]
    return (auroc if auroc is not None else -1.0, -entry["valid_loss"])


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr, leave=True)


def _say(message: str, enabled: bool) -> None:
    log.info(message)
    if enabled:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------


def tune_thresholds(probs: np.ndarray, y: np.ndarray, labels: Sequence[str], min_precision: float) -> dict:
    return {
        label: round(metrics.tune_threshold(probs[:, j], y[:, j], min_precision), 4)
        for j, label in enumerate(labels)
    }


def save_checkpoint(
    out: Path,
    model: ModernBertForSequenceClassification,
    tokenizer_json: str,
    tokenizer_config: dict,
    thresholds: dict[str, float],
    name: str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """config.json (HF form), model.safetensors, tokenizer.json, tokenizer_config.json, thresholds.json."""
    out.mkdir(parents=True, exist_ok=True)
    hf = {"_name_or_path": name, **model.config.to_hf_dict(), "initializer_range": INITIALIZER_RANGE}
    _write_json(out / "config.json", hf)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sorted(model.state_dict().items())}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it 0600; servers run as other users
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "thresholds.json", thresholds)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_config(max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "mask_token": "[MASK]",
        "model_max_length": max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }


# ---------------------------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------------------------


def train_command(args: argparse.Namespace) -> int:
    from model import card, evaluate

    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = read_rows(Path(args.data))
    if args.valid:
        train_rows, valid_rows = rows, read_rows(Path(args.valid))
    else:
        train_rows, valid_rows = split_rows(rows, args.valid_fraction, args.seed)
    labels = args.labels.split(",") if args.labels else default_labels(train_rows)
    if len(set(labels)) != len(labels) or not all(labels):
        raise InvalidInputError(f"must be distinct non-empty names, got {labels}", field="--labels")
    y_train = targets(train_rows, labels, args.data)
    y_valid = targets(valid_rows, labels, args.valid or f"{args.data} (validation split)")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.init:
        src = Path(args.init)
        model, _, report = load_model(src, new_head=True, labels=labels)
        tokenizer = TextTokenizer.from_file(src / "tokenizer.json")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise CheckpointError(
                f"{src}: tokenizer has {tokenizer.vocab_size} tokens, vocab_size is {model.config.vocab_size}"
            )
        tok_json = (src / "tokenizer.json").read_text(encoding="utf-8")
        # what the init's tokenizer config applied over its tokenizer.json is baked into ours; its special
        # token names and split_special_tokens (not kept by a saved tokenizer.json) go into our config
        init_config = tokenizer.hf_config
        if init_config:
            tok_json = tokenizer.tok.to_str(pretty=True)
        specials = special_token_settings(init_config)
        origin = (
            f"fine-tuned from {src} ({report.kind} checkpoint"
            + (f"; new: {', '.join(report.initialized)}" if report.initialized else "")
            + (f"; dropped: {', '.join(report.dropped)}" if report.dropped else "")
            + ")"
        )
        _say(origin, not args.quiet)
        lr = args.lr or 5e-5
    else:
        model, tokenizer = scratch_model(args.config, train_rows, labels, args.vocab_size, args.seed)
        tok_json, specials = tokenizer.tok.to_str(pretty=True), {}
        origin = f"trained from scratch (--config {args.config}, tokenizer of {tokenizer.vocab_size} tokens)"
        lr = args.lr or 1e-3
    config = model.config
    max_tokens = args.max_tokens or min(512, config.max_position_embeddings)
    if max_tokens > config.max_position_embeddings:
        raise InvalidInputError(
            f"must be <= max_position_embeddings {config.max_position_embeddings}", field="--max-tokens"
        )
    room = max_tokens - tokenizer.template.pair_extra - args.max_context_tokens
    if room <= 64:
        raise InvalidInputError(
            f"leaves {room} tokens for a response after {args.max_context_tokens} context "
            "tokens; raise --max-tokens or lower --max-context-tokens",
            field="--max-tokens",
        )
    recipe = Recipe(
        epochs=args.epochs,
        lr=lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        schedule=args.schedule,
        batch_tokens=max(args.batch_tokens, max_tokens),
        batch_sequences=args.batch_sequences,
        max_tokens=max_tokens,
        max_context_tokens=args.max_context_tokens,
        windows=args.windows,
        seed=args.seed,
        max_steps=args.max_steps,
        min_precision=args.min_precision,
        token_mask=args.token_mask,
    )
    trainer = Trainer(model, tokenizer, recipe, device, args.backend, progress=not args.quiet)
    result = trainer.fit(train_rows, y_train, valid_rows, y_valid)
    assert result.valid_probs is not None
    thresholds = tune_thresholds(result.valid_probs, y_valid, labels, recipe.min_precision)
    out = Path(args.out)
    name = args.name or out.resolve().name
    save_checkpoint(
        out,
        result.model,
        tok_json,
        {**tokenizer_config(config.max_position_embeddings), **specials},
        thresholds,
        name,
        torch.bfloat16 if args.save_dtype == "bfloat16" else torch.float32,
    )
    if args.init:
        for extra in ("special_tokens_map.json",):
            if (Path(args.init) / extra).exists():
                shutil.copyfile(Path(args.init) / extra, out / extra)

    valid_report = metrics.label_report(result.valid_probs, y_valid, labels, thresholds)
    flagged = (result.valid_probs >= np.array([thresholds[x] for x in labels])).any(axis=1)
    valid_items = metrics.counts(flagged, y_valid.any(axis=1)).to_dict()
    report_sets = {}
    if args.report_set:
        from model.classifier import load_classifier

        clf = load_classifier(out, device=str(device) if device.type == "cuda" else "cpu")
        for path in args.report_set:
            report_sets[path] = evaluate.evaluate_file(clf, Path(path))
    summary = {
        "name": name,
        "origin": origin,
        "labels": labels,
        "recipe": {
            **vars(recipe),
            "backend": trainer.backend,
            "device": device.type,
            "autocast": "bfloat16" if trainer.autocast else None,
        },
        "architecture": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "local_attention",
                "max_position_embeddings",
                "classifier_pooling",
            )
        },
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "data": {
            "train": card.data_summary(train_rows, labels, args.data),
            "valid": card.data_summary(valid_rows, labels, args.valid or "validation split"),
        },
        "steps": result.steps,
        "tokens_seen": result.tokens,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "thresholds": thresholds,
        "threshold_rule": card.threshold_rule(recipe.min_precision),
        "valid": {
            "labels": valid_report,
            "items": valid_items,
            "macro_auroc": metrics.macro(valid_report, "auroc"),
            "macro_f1": metrics.macro(valid_report, "f1"),
        },
        "report_sets": report_sets,
    }
    summary = _jsonable(summary)  # the card is rendered from exactly what train_metrics.json holds
    _write_json(out / "train_metrics.json", summary)
    stats_path = Path(args.data).parent / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    (out / "MODEL_CARD.md").write_text(card.render(summary, stats), encoding="utf-8")
    elapsed = time.monotonic() - started
    print(
        f"wrote {out}: best epoch {result.best_epoch}, validation macro AUROC "
        f"{_round(summary['valid']['macro_auroc'])}; {result.steps} steps, {result.tokens} tokens in "
        f"{result.seconds:.0f} s training ({result.tokens / max(result.seconds, 1e-9):.0f} tokens/s), "
        f"{elapsed:.0f} s in all"
    )
    for path, m in report_sets.items():
        print(evaluate.one_line(path, m))
    return 0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 5)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return obj


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a multi-label ModernBERT classifier and write a servable checkpoint directory",
        description="Fine-tune a checkpoint (--init DIR) or train a small ModernBERT from scratch (--config) "
        "on JSONL items {text, role?, context?, labels: [...]}. See docs/model.md.",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="training items (JSONL)")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--init", metavar="DIR", help="start from this checkpoint (MLM ModernBERT or a classifier)"
    )
    src.add_argument(
        "--config", metavar="small|tiny|FILE.json", help="train from scratch with this architecture"
    )
    p.add_argument("--valid", metavar="FILE", help="validation items (default: a seeded split of --data)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="share split off when no --valid (0.1)")
    p.add_argument("--labels", help="comma-separated label names in logit order (default: those in the data)")
    p.add_argument("--vocab-size", type=int, help="with --config: tokenizer size (default: the preset's)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument(
        "--lr", type=float, help="peak learning rate (default 1e-3 from scratch, 5e-5 with --init)"
    )
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.06, help="warm-up share of all steps (0.06)")
    p.add_argument("--schedule", choices=("cosine", "linear"), default="cosine", help="decay after warm-up")
    p.add_argument("--batch-tokens", type=int, default=8192, help="token budget per step (8192)")
    p.add_argument("--batch-sequences", type=int, default=256, help="sequences per step at most (256)")
    p.add_argument(
        "--max-tokens", type=int, help="training window (default min(512, max_position_embeddings))"
    )
    p.add_argument("--max-context-tokens", type=int, default=256, help="context kept for responses (256)")
    p.add_argument(
        "--windows",
        choices=("first", "all"),
        default="first",
        help="long items: train on the first window (default) or on all windows",
    )
    p.add_argument(
        "--min-precision",
        type=float,
        default=DEFAULT_MIN_PRECISION,
        help="threshold rule: max F1 subject to validation precision >= this (0.9)",
    )
    p.add_argument(
        "--report-set",
        action="append",
        metavar="FILE",
        help="also evaluate the written model on this JSONL for the model card (never used to train, "
        "tune or select); repeatable",
    )
    p.add_argument(
        "--token-mask",
        type=float,
        default=0.0,
        help="augmentation: share of content tokens replaced by [MASK] per step (default 0)",
    )
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--device", default="auto", type=parse_device, help="auto | cpu | cuda[:N]")
    p.add_argument("--backend", default=None, help="attention backend: sdpa | varlen | flash_attn (auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--name", default=None, help="model name in config.json (default: the --out folder name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train_command)
