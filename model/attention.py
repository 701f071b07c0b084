"""Attention backends over a packed token stream.

Owns: the four ways we compute bidirectional attention on unpadded batches, behind one interface —
  * "flash_attn": flash-attn's `flash_attn_varlen_func` (CUDA, when the package is importable);
  * "varlen":     PyTorch's own flash varlen kernel `torch.nn.attention.varlen.varlen_attn` (CUDA);
  * "sdpa":       `scaled_dot_product_attention` on a (B, S) padded view of the stream (CPU, or any device),
                  with a key-padding mask and, on local layers, the |i - j| <= window band mask;
  * "triton":     our own varlen kernel with small tiles (model/triton_attention.py; CUDA, or Triton's
                  interpreter), chosen only when asked for until a GPU run measures it against FA2;
  * "triton_local": our kernel on the local layers only, the global ones through flash (flash-attn, else
                  torch's varlen; CUDA) — for where small tiles pay only inside the ±window band.
A local layer sees keys with |i - j| <= window (ModernBERT: local_attention // 2 = 64), i.e. flash's
`window_size=(window, window)`. Must not know: weights, tokenizers, batching policy.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.errors import InvalidInputError
from model.packing import Packed, pad_index

BACKENDS = ("flash_attn", "varlen", "sdpa", "triton", "triton_local")
# the kernels that take the packed stream as it is
VARLEN = ("flash_attn", "varlen", "triton", "triton_local")
TRITON = ("triton", "triton_local")  # the backends that run model/triton_attention.py's kernel


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
            raise InvalidInputError(
                f"unknown attention backend {requested!r}; choose from {BACKENDS}", field="backend"
            )
        if requested in ("flash_attn", "varlen") and device.type != "cuda":
            raise InvalidInputError(f"{requested!r} needs a CUDA device, got {device}", field="backend")
        if requested == "flash_attn" and not has_flash_attn():
            raise InvalidInputError(
                "'flash_attn' requested but the flash_attn package is not installed", field="backend"
            )
        if requested == "varlen" and not has_torch_varlen():
            raise InvalidInputError(
                "'varlen' requested but torch.nn.attention.varlen is not available", field="backend"
            )
        if requested in TRITON:
            from model.fused import triton_missing

            if why := triton_missing(device, "its kernels"):
                raise InvalidInputError(f"{requested!r} requested, but {why}", field="backend")
        flash = device.type == "cuda" and (has_flash_attn() or has_torch_varlen())
        if requested == "triton_local" and not flash:
            raise InvalidInputError(
                f"'triton_local' runs its global layers on a CUDA flash kernel, none on {device}",
                field="backend",
            )
        return requested
    if device.type == "cuda":
        if has_flash_attn():
            return "flash_attn"
        if has_torch_varlen():
            return "varlen"
    return "sdpa"


def fastest_backend(device: torch.device, dtype: torch.dtype, head_dim: int, fused_gemm: bool) -> str:
    """SAFETY_ATTENTION=auto for inference: beside the fused GEMMs (`fused_gemm`), where torch's varlen flash
    kernel is what `pick_backend` finds (CUDA, no flash-attn), "triton_local" — our stream-tiled kernel on
    the local layers, that flash kernel on the global ones — when Triton runs here and the head dim tiles;
    else `pick_backend`'s choice. Measured on an H200 (docs/benchmarks.md, 2026-11-28): with the fused
    GEMMs, 1.05-1.15x the fused GEMMs on the varlen kernel alone on traffic, short_fixed and long_var;
    without them 0.95-1.18x, so not chosen there. Against flash-attn's own window it is not measured, so
    an installed flash-attn keeps every layer. Not for training: our kernel has no backward."""
    plain = pick_backend(device)
    if not fused_gemm or plain != "varlen" or dtype not in (torch.bfloat16, torch.float16):
        return plain
    from model import triton_attention
    from model.fused import triton_missing

    if not triton_attention.tileable(head_dim) or triton_missing(device, "its kernels"):
        return plain
    return "triton_local"


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
    global_mask: torch.Tensor | None = None  # sdpa: (B, 1, 1, S) bool key padding, None when none is padded
    local_mask: torch.Tensor | None = None  # sdpa: (B, 1, S, S) bool, None when no key is out of the window
    block: int = 0  # sdpa on long buckets: local layers run query blocks of this size (0 = dense band mask)
    block_mask: torch.Tensor | None = None  # (B*nb, 1, block, block + 2*window) bool
    dense: bool = False  # sdpa: every sequence has the same length, so the (B, S) view is a reshape


class Attention:
    """Callable attention backend: `prepare(batch)` once per batch, then `attend(q, k, v, ctx, local)`."""

    def __init__(self, name: str, window: int) -> None:
        if name not in BACKENDS:
            raise InvalidInputError(f"unknown attention backend {name!r}", field="backend")
        self.name = name
        self.window = window
        # flash_attn's or torch's flash varlen kernel (triton_local: its global layers), and our Triton kernel
        self._flash: Callable | None = None
        self._triton: Callable | None = None
        if name == "flash_attn" or (name == "triton_local" and has_flash_attn()):
            from flash_attn import flash_attn_varlen_func

            self._flash = flash_attn_varlen_func
        elif name in ("varlen", "triton_local"):
            from torch.nn.attention.varlen import varlen_attn

            self._flash = varlen_attn
        if name in TRITON:
            from model.triton_attention import varlen_attention

            self._triton = varlen_attention

    def prepare(self, batch: Packed) -> AttentionContext:
        ctx = AttentionContext(batch=batch, window=self.window)
        if self.name != "sdpa":
            return ctx
        device = batch.input_ids.device
        ctx.index, ctx.valid = pad_index(batch.lengths, device)  # (B, S), (B, S)
        S = batch.max_seqlen
        padded = min(batch.lengths) != S
        ctx.dense = not padded
        key_ok = ctx.valid[:, None, None, :]  # (B, 1, 1, S)
        if padded:
            # a key-padding mask broadcast over the queries: every sequence has a real key, so no row is fully
            # masked (pad query rows see the real keys and are dropped later); SDPA reads it with a zero query
            # stride instead of a (B, 1, S, S) mask
            ctx.global_mask = key_ok
        block = 2 * self.window
        if block and S >= 2 * (block + 2 * self.window):  # (window 0, local_attention 1: the band below)
            # long bucket: a local layer costs S x 4w per head in query blocks instead of S x S
            ctx.block = block
            ctx.block_mask = blocked_band_mask(batch.lengths, self.window, block, device)
        elif self.window + 1 < S:
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
        # a window that spans every sequence of the batch masks nothing: the unwindowed kernel is faster
        w = ctx.window if local and b.max_seqlen > ctx.window + 1 else -1
        if self._triton is not None and (self._flash is None or w >= 0):
            return self._triton(q, k, v, b.cu_seqlens, b.seq_index, b.max_seqlen, w)
        if self._flash is not None:
            return self._flash(
                q, k, v, b.cu_seqlens, b.cu_seqlens, b.max_seqlen, b.max_seqlen, window_size=(w, w)
            )
        assert ctx.index is not None and ctx.valid is not None
        T, H, D = q.shape
        if ctx.dense:  # equal lengths: the stream is already the (B, S) grid; no gather, no scatter back
            B, S = b.num_seqs, b.max_seqlen
            qp, kp, vp = (t.view(B, S, H, D) for t in (q, k, v))
            unpad = lambda o: o.reshape(T, H, D)  # noqa: E731
        else:
            qp, kp, vp = (t[ctx.index] for t in (q, k, v))  # (B, S, H, D)
            unpad = lambda o: o[ctx.valid]  # noqa: E731
        if local and ctx.block:
            return unpad(blocked_local_attention(qp, kp, vp, ctx.block_mask, ctx.window, ctx.block))
        qp, kp, vp = (t.transpose(1, 2) for t in (qp, kp, vp))  # (B, H, S, D)
        mask = ctx.local_mask if local else ctx.global_mask
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)  # (B, H, S, D)
        return unpad(out.transpose(1, 2))  # (T, H, D)


def blocked_band_mask(
    lengths: tuple[int, ...], window: int, block: int, device: torch.device | str
) -> torch.Tensor:
    """(B*nb, 1, block, block + 2*window) bool for `blocked_local_attention`.

    Query r of block i sits at position i*block + r; key j of its span at i*block - window + j. A key is
    visible when |q - k| <= window and 0 <= k < length; a pad query sees itself only (no fully masked row)."""
    B, S = len(lengths), max(lengths)
    nb = -(-S // block)
    span = block + 2 * window
    lens = torch.tensor(lengths, device=device)[:, None, None, None]  # (B, 1, 1, 1)
    starts = torch.arange(nb, device=device)[None, :, None, None] * block  # (1, nb, 1, 1)
    q = starts + torch.arange(block, device=device)[None, None, :, None]  # (1, nb, c, 1)
    k = starts - window + torch.arange(span, device=device)[None, None, None, :]  # (1, nb, 1, span)
    visible = ((q - k).abs() <= window) & (k >= 0) & (k < lens)  # (B, nb, c, span)
    visible = visible | ((q >= lens) & (k == q))
    return visible.reshape(B * nb, 1, block, span)


def blocked_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, window: int, block: int
) -> torch.Tensor:
    """Band attention |i - j| <= window on (B, S, H, D) by query blocks: each block of `block` queries
    attends to its `block + 2*window` neighbouring keys. Returns (B, S, H, D)."""
    B, S, H, D = q.shape
    nb = -(-S // block)
    Sp = nb * block
    span = block + 2 * window
    qb = F.pad(q, (0, 0, 0, 0, 0, Sp - S)).view(B, nb, block, H, D)  # (B, nb, c, H, D)
    qb = qb.permute(0, 1, 3, 2, 4).reshape(B * nb, H, block, D)  # (B*nb, H, c, D)

    def spans(t: torch.Tensor) -> torch.Tensor:
        tp = F.pad(t, (0, 0, 0, 0, window, Sp - S + window))  # (B, Sp + 2w, H, D)
        tb = tp.unfold(1, span, block)  # (B, nb, H, D, span)
        return tb.permute(0, 1, 2, 4, 3).reshape(B * nb, H, span, D)  # (B*nb, H, span, D)

    out = F.scaled_dot_product_attention(qb, spans(k), spans(v), attn_mask=mask)  # (B*nb, H, c, D)
    out = out.view(B, nb, H, block, D).permute(0, 1, 3, 2, 4).reshape(B, Sp, H, D)
    return out[:, :S]
