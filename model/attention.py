"""Attention backends over a packed token stream.

Owns: the three ways we compute bidirectional attention on unpadded batches, behind one interface —
  * "flash_attn": flash-attn's `flash_attn_varlen_func` (CUDA, when the package is importable);
  * "varlen":     PyTorch's own flash varlen kernel `torch.nn.attention.varlen.varlen_attn` (CUDA);
  * "sdpa":       `scaled_dot_product_attention` on a (B, S) padded view of the stream (CPU, or any device),
                  with a key-padding mask and, on local layers, the |i - j| <= window band mask.
A local layer sees keys with |i - j| <= window (ModernBERT: local_attention // 2 = 64), i.e. flash's
`window_size=(window, window)`. Must not know: weights, tokenizers, batching policy.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.packing import Packed, pad_index

BACKENDS = ("flash_attn", "varlen", "sdpa")


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(device: torch.device, requested: str | None = None) -> str:
    """flash-attn if importable on CUDA, else torch varlen on CUDA, else SDPA. `requested` overrides."""
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend: unknown attention backend {requested!r}; choose from {BACKENDS}")
        if requested in ("flash_attn", "varlen") and device.type != "cuda":
            raise ValueError(f"backend: {requested!r} needs a CUDA device, got {device}")
        if requested == "flash_attn" and not has_flash_attn():
            raise ValueError("backend: 'flash_attn' requested but the flash_attn package is not installed")
        if requested == "varlen" and not has_torch_varlen():
            raise ValueError("backend: 'varlen' requested but torch.nn.attention.varlen is not available")
        return requested
    if device.type == "cuda":
        if has_flash_attn():
            return "flash_attn"
        if has_torch_varlen():
            return "varlen"
    return "sdpa"


def band_mask(size: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(S, S) bool: True where |i - j| <= window (a local layer's visible keys)."""
    i = torch.arange(size, device=device)
    return (i[:, None] - i[None, :]).abs() <= window


@dataclass
class AttentionContext:
    """Per-batch state shared by every layer: built once in `prepare`, read by `attend`."""

    batch: Packed
    window: int
    index: torch.Tensor | None = None  # sdpa: (B, S) gather index into the stream
    valid: torch.Tensor | None = None  # sdpa: (B, S) True on real tokens
    global_mask: torch.Tensor | None = None  # sdpa: (B, 1, 1|S, S) bool, None when nothing is padded
    local_mask: torch.Tensor | None = None  # sdpa: (B, 1, S, S) bool, None when no key is out of the window


class Attention:
    """Callable attention backend: `prepare(batch)` once per batch, then `attend(q, k, v, ctx, local)`."""

    def __init__(self, name: str, window: int) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend: unknown attention backend {name!r}")
        self.name = name
        self.window = window
        if name == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            self._flash = flash_attn_varlen_func
        elif name == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            self._varlen = varlen_attn

    def prepare(self, batch: Packed) -> AttentionContext:
        ctx = AttentionContext(batch=batch, window=self.window)
        if self.name != "sdpa":
            return ctx
        device = batch.input_ids.device
        ctx.index, ctx.valid = pad_index(batch.lengths, device)  # (B, S), (B, S)
        S = batch.max_seqlen
        padded = min(batch.lengths) != S
        key_ok = ctx.valid[:, None, None, :]  # (B, 1, 1, S)
        if padded:
            # pad queries see themselves, so no row is fully masked (no NaN); pad rows are dropped later
            eye = torch.eye(S, dtype=torch.bool, device=device)
            pad_q = ~ctx.valid[:, None, :, None]  # (B, 1, S, 1)
            ctx.global_mask = key_ok | (pad_q & eye)
        if self.window + 1 < S:
            band = band_mask(S, self.window, device)[None, None]  # (1, 1, S, S)
            ctx.local_mask = (band & key_ok) | (~ctx.valid[:, None, :, None] & band) if padded else band
        else:
            ctx.local_mask = ctx.global_mask
        return ctx

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, local: bool
    ) -> torch.Tensor:
        """q, k, v: (T, H, D) on the packed stream -> (T, H, D)."""
        b = ctx.batch
        w = ctx.window if local else -1
        if self.name == "flash_attn":
            return self._flash(
                q, k, v, b.cu_seqlens, b.cu_seqlens, b.max_seqlen, b.max_seqlen, window_size=(w, w)
            )
        if self.name == "varlen":
            return self._varlen(
                q, k, v, b.cu_seqlens, b.cu_seqlens, b.max_seqlen, b.max_seqlen, window_size=(w, w)
            )
        assert ctx.index is not None and ctx.valid is not None
        qp, kp, vp = (t[ctx.index].transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        mask = ctx.local_mask if local else ctx.global_mask
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)  # (B, H, S, D)
        return out.transpose(1, 2)[ctx.valid]  # (T, H, D)
