"""CPU benchmark: our packed classifier vs HF transformers on the same random weights.

Workload "traffic" of gpu-anchor.md (moderation mix: median 120 tokens, long tail), scaled down to the first
N sequences for a 2-core machine. HF runs in arrival order and length-sorted (batch 32, SDPA, fp32,
inference_mode); we run the engine's planner + packed forward. Prints tokens/s and the ratios measured in
this one run. Usage: python bench/cpu.py [--shape base|small] [--n 128] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import CLS, PAD, SEP, anchor_workloads, hf_batches, padded

SHAPES = {
    "base": dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12),
    "small": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4),
}


def build_checkpoint(shape: str, directory: Path) -> None:
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from model.tokenizer import train_tokenizer

    cfg = ModernBertConfig(
        **SHAPES[shape], num_labels=7, problem_type="multi_label_classification", classifier_pooling="mean",
        pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP, bos_token_id=CLS, eos_token_id=SEP,
    )  # fmt: skip
    torch.manual_seed(0)
    ModernBertForSequenceClassification(cfg).save_pretrained(directory, safe_serialization=True)
    train_tokenizer(["a tiny corpus for a tokenizer file"] * 10, vocab_size=300).save(
        str(directory / "tokenizer.json")
    )


def time_hf(model, seqs, batch: int, sort: bool) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for idx in hf_batches(seqs, batch, sort):
            ids, mask = padded(seqs, idx)
            model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - t0


def time_ours(clf, seqs) -> float:
    t0 = time.perf_counter()
    clf.run_windows(seqs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="base")
    ap.add_argument("--n", type=int, default=128, help="first N sequences of the traffic workload")
    ap.add_argument("--workload", default="traffic")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs per engine")
    ap.add_argument("--json", default=None, help="also write results to this file")
    args = ap.parse_args()

    from transformers import ModernBertForSequenceClassification

    from model import load_classifier

    wl = anchor_workloads()[args.workload].head(args.n)
    seqs = wl.sequences()
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(args.shape, Path(tmp))
        clf = load_classifier(tmp, device="cpu")
        hf = ModernBertForSequenceClassification.from_pretrained(tmp, attn_implementation="sdpa").eval()

    # warm-up both on a few sequences, then a parity spot check on the real workload's first batch
    idx = list(range(min(8, len(seqs))))
    ids, mask = padded(seqs, idx)
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    err = (clf.forward([seqs[i] for i in idx]) - ref).abs().max().item()

    # best of --repeat runs each (the first run of a shape pays one-time allocator / oneDNN set-up)
    runs = {
        "hf_arrival": lambda: time_hf(hf, seqs, wl.hf_batch, sort=False),
        "hf_sorted": lambda: time_hf(hf, seqs, wl.hf_batch, sort=True),
        "ours": lambda: time_ours(clf, seqs),
    }
    rows = {name: min(fn() for _ in range(args.repeat)) for name, fn in runs.items()}
    tok = wl.tokens
    print(f"# bench/cpu.py  shape={args.shape} workload={args.workload} n={len(seqs)} tokens={tok} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} cores={os.cpu_count()}")  # fmt: skip
    print(f"# parity spot check: max |Δlogit| = {err:.2e}")
    print(f"{'engine':<12} {'seconds':>9} {'tokens/s':>10} {'ours ×':>8}")
    for name, sec in rows.items():
        print(f"{name:<12} {sec:9.2f} {tok / sec:10.0f} {sec / rows['ours']:8.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "tokens": tok, "seconds": rows, "err": err})
        )


if __name__ == "__main__":
    main()
