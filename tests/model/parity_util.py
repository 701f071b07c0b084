"""What the parity tests compare our engine with: transformers' model on a right-padded batch
(`hf_logits`) of random token ids (`random_ids`) of LENGTHS."""

from __future__ import annotations

import random

import torch

# One call mixes 1 token up to several hundred, so local windows (16 -> ±8) and padding both bite.
LENGTHS = [1, 2, 3, 7, 9, 16, 17, 18, 33, 64, 100, 129, 257, 300, 411]


def random_ids(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids in [5, vocab) of these lengths, the same for the same seed."""
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


def hf_logits(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """HF on a right-padded batch (the padded path is where ports go wrong)."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits
