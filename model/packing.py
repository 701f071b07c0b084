"""Packing: turn a list of token-id sequences into one unpadded token stream.

Owns: the packed batch layout (`input_ids`, per-sequence `positions`, `cu_seqlens`, `max_seqlen`) and the
gather index a padded kernel (CPU SDPA) needs to view the stream as a (B, S) grid. Pure tensor helpers:
no model, no device policy, no tokenizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from model.errors import InvalidInputError


@dataclass(frozen=True)
class Packed:
    input_ids: torch.Tensor  # (T,) int64: all sequences back to back, no padding
    positions: torch.Tensor  # (T,) int64: position of each token inside its own sequence
    seq_index: torch.Tensor  # (T,) int64: which sequence each token belongs to
    cu_seqlens: torch.Tensor  # (B+1,) int32: sequence b is tokens [cu[b], cu[b+1])
    lengths: tuple[int, ...]  # host copy of the B lengths: no device sync needed to read them
    max_seqlen: int  # host int, as the varlen kernels want it

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    TENSORS = ("input_ids", "positions", "seq_index", "cu_seqlens")

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.TENSORS)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Packed:
        """The same batch with `fn` applied to each of its tensors (host metadata kept)."""
        return replace(self, **{name: fn(getattr(self, name)) for name in self.TENSORS})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packed:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Packed:
        return self.map(torch.Tensor.pin_memory)


def pack(sequences: list[list[int]]) -> Packed:
    """Concatenate token-id lists into one stream (on the CPU). Every sequence must be non-empty."""
    if not sequences:
        raise InvalidInputError("is empty; a batch needs at least one sequence", field="sequences")
    lengths = tuple(len(s) for s in sequences)
    if min(lengths) == 0:
        raise InvalidInputError(
            "is empty; every sequence needs at least one token", field=f"sequences[{lengths.index(0)}]"
        )
    lens = np.asarray(lengths, dtype=np.int64)
    cu = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(cu[-1]))
    positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lens)
    return Packed(
        input_ids=torch.from_numpy(flat),
        positions=torch.from_numpy(positions),
        seq_index=torch.from_numpy(np.repeat(np.arange(len(lengths), dtype=np.int64), lens)),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        lengths=lengths,
        max_seqlen=max(lengths),
    )


def pad_index(
    lengths: tuple[int, ...], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index viewing a packed stream as a right-padded (B, S) grid.

    Returns (index, valid): index[b, s] is the packed position of token s of sequence b (0 where padded),
    valid[b, s] is True where s < lengths[b]. `x[index]` pads, `y[valid]` packs back in stream order."""
    lens = torch.tensor(lengths, dtype=torch.long, device=device)  # (B,)
    starts = torch.cumsum(lens, 0) - lens  # (B,)
    s = torch.arange(max(lengths), device=device)  # (S,)
    valid = s[None, :] < lens[:, None]  # (B, S)
    index = torch.where(valid, starts[:, None] + s[None, :], torch.zeros_like(valid, dtype=torch.long))
    return index, valid
