"""Benchmark workloads of ../shared/reference/gpu-anchor.md, reproduced exactly, plus what the bench scripts
share: the model shapes, the random-weight benchmark checkpoint, HF's padded batch loop, a free port.

Lengths come from one `torch.Generator().manual_seed(0)`, drawn in table order; token ids are random in
[5, 50000) with [CLS]=50281 first and [SEP]=50282 last (lengths include both). No engine code.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

CLS, SEP, PAD = 50281, 50282, 50283
# ModernBERT layouts for random-weight benchmark models ("base" is ModernBERT-base's shape).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4),
    "base": dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12),
}


@dataclass
class Workload:
    name: str
    lengths: list[int]
    hf_batch: int

    def sequences(self, seed: int = 1) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for n in self.lengths:
            body = torch.randint(5, 50000, (n - 2,), generator=g).tolist()
            out.append([CLS, *body, SEP])
        return out

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def head(self, n: int) -> Workload:
        """The first n sequences (scaled down for small machines), same distribution."""
        return Workload(self.name, self.lengths[:n], self.hf_batch)


def anchor_workloads() -> dict[str, Workload]:
    g = torch.Generator().manual_seed(0)
    short_var = torch.normal(256.0, 64.0, (1024,), generator=g).round().clamp(16, 512)
    traffic = torch.exp(math.log(120) + torch.randn(4096, generator=g)).round().clamp(8, 8192)
    long_var = torch.normal(4096.0, 1024.0, (64,), generator=g).round().clamp(512, 8192)
    return {
        "short_fixed": Workload("short_fixed", [512] * 1024, 64),
        "short_var": Workload("short_var", [int(x) for x in short_var], 64),
        "traffic": Workload("traffic", [int(x) for x in traffic], 32),
        "long_fixed": Workload("long_fixed", [8192] * 64, 8),
        "long_var": Workload("long_var", [int(x) for x in long_var], 8),
    }


def memory_cases(lengths: list[int], budget: int) -> list[tuple[str, list[list[int]]]]:
    """The memory tables' cases: one input per length (ascending), then one full token budget of 512-token
    inputs. Returns (name, sequences) pairs."""
    seq = lambda n: [CLS, *([7] * (n - 2)), SEP]  # noqa: E731
    count = budget // 512
    singles = [(f"1 x {n}", [seq(n)]) for n in sorted(lengths)]
    return [*singles, (f"{count} x 512 (budget {budget})", [seq(512)] * count)]


def hf_batches(seqs: list[list[int]], batch: int, sort: bool) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if sort else list(range(len(seqs)))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def padded(seqs: list[list[int]], idx: list[int], device: str | torch.device = "cpu"):
    S = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), S), PAD, dtype=torch.long)
    mask = torch.zeros(len(idx), S, dtype=torch.long)
    for r, i in enumerate(idx):
        ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
        mask[r, : len(seqs[i])] = 1
    return ids.to(device), mask.to(device)


def write_checkpoint(directory: Path, shape: dict) -> None:
    """A random-weight HF ModernBERT classifier of `shape` (7 labels, multi-label, mean pooling, the anchor's
    special ids) saved with `save_pretrained`, plus a small tokenizer file (the benchmarks feed token ids)."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from model.tokenizer import train_tokenizer

    cfg = ModernBertConfig(**shape, num_labels=7, problem_type="multi_label_classification",
                           classifier_pooling="mean", pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP,
                           bos_token_id=CLS, eos_token_id=SEP)  # fmt: skip
    torch.manual_seed(0)
    ModernBertForSequenceClassification(cfg).save_pretrained(directory, safe_serialization=True)
    train_tokenizer(["tokenizer file for the benchmark"] * 10, vocab_size=300).save(
        str(directory / "tokenizer.json")
    )


def hf_run(model, seqs: list[list[int]], batch: int, sort: bool, device: str | torch.device = "cpu") -> None:
    """HF's way: padded batches of `batch`, in arrival order or length-sorted, under `inference_mode`."""
    with torch.inference_mode():
        for idx in hf_batches(seqs, batch, sort):
            ids, mask = padded(seqs, idx, device)
            model(input_ids=ids, attention_mask=mask)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
