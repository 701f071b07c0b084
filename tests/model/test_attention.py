"""Attention backends against a naive per-sequence reference (|i - j| <= window on local layers)."""

from __future__ import annotations

import pytest
import torch

from model.attention import Attention, blocked_band_mask, pick_backend
from model.packing import pack


def reference(q, k, v, lengths, window: int | None) -> torch.Tensor:
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        scores = qs @ ks.transpose(-1, -2) / qs.shape[-1] ** 0.5  # (H, n, n)
        if window is not None:
            i = torch.arange(n)
            scores = scores.masked_fill((i[:, None] - i[None, :]).abs() > window, float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))  # (n, H, D)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize(
    "lengths",
    [[5], [40, 40], [1, 3, 17, 60], [200, 7, 64, 65, 129], [300], [97, 260, 33], [70, 70, 70], [9, 9]],
    ids=lambda ls: "-".join(map(str, ls)),
)
@pytest.mark.parametrize("local", [False, True])
def test_sdpa_backend_matches_reference(lengths: list[int], local: bool) -> None:
    torch.manual_seed(0)
    window = 8  # blocked local path kicks in at S >= 2 * (16 + 16) = 64
    T, H, D = sum(lengths), 3, 16
    q, k, v = (torch.randn(T, H, D, dtype=torch.float64) for _ in range(3))
    batch = pack([[1] * n for n in lengths])
    attn = Attention("sdpa", window)
    ctx = attn.prepare(batch)
    assert bool(ctx.block) == (max(lengths) >= 64)
    assert ctx.dense == (len(set(lengths)) == 1)  # equal lengths: a reshape instead of a gather
    got = attn.attend(q, k, v, ctx, local)
    want = reference(q, k, v, lengths, window if local else None)
    assert got.shape == (T, H, D)
    assert torch.allclose(got, want, atol=1e-10)


def test_blocked_mask_shape_and_pad_rows() -> None:
    m = blocked_band_mask((70, 3), window=4, block=8, device="cpu")
    nb = 9  # ceil(70 / 8)
    assert m.shape == (2 * nb, 1, 8, 16)
    assert m.any(dim=-1).all()  # no fully masked query row, pads included


def test_backend_choice_on_cpu() -> None:
    assert pick_backend(torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        pick_backend(torch.device("cpu"), "flash_attn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        pick_backend(torch.device("cpu"), "xformers")


@pytest.mark.parametrize(
    ("flash_attn", "varlen", "triton", "dtype", "head_dim", "fused", "expected"),
    [
        (False, True, True, torch.bfloat16, 64, True, "triton_local"),  # the GPU image: varlen + triton
        (False, True, True, torch.float16, 32, True, "triton_local"),
        (False, True, True, torch.bfloat16, 64, False, "varlen"),  # measured faster beside the fused GEMMs
        (True, True, True, torch.bfloat16, 64, True, "flash_attn"),  # flash-attn installed: every layer on it
        (False, True, False, torch.bfloat16, 64, True, "varlen"),  # no triton
        (False, True, True, torch.bfloat16, 48, True, "varlen"),  # a head dim our kernel cannot tile
        (False, True, True, torch.float32, 64, True, "varlen"),  # fp32: the runner refuses varlen anyway
        (False, False, True, torch.bfloat16, 64, True, "sdpa"),  # no flash kernel at all
    ],
)
def test_auto_attention_on_cuda_is_triton_local_where_it_can_run(
    monkeypatch, flash_attn, varlen, triton, dtype, head_dim, fused, expected
) -> None:
    """SAFETY_ATTENTION=auto (the server's and worker's default) for inference, by what this host has."""
    from model import attention
    from model import fused as fused_module

    monkeypatch.setattr(attention, "has_flash_attn", lambda: flash_attn)
    monkeypatch.setattr(attention, "has_torch_varlen", lambda: varlen)
    monkeypatch.setattr(fused_module, "has_triton", lambda: triton)
    assert attention.fastest_backend(torch.device("cuda"), dtype, head_dim, fused) == expected


def test_auto_attention_on_the_cpu_is_sdpa() -> None:
    from model.attention import fastest_backend

    assert fastest_backend(torch.device("cpu"), torch.float32, 64, False) == "sdpa"
    assert fastest_backend(torch.device("cpu"), torch.bfloat16, 64, True) == "sdpa"
