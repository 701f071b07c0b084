"""The "triton" attention backend (model/triton_attention.py) against SDPA on the same packed batches.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py), in fp32 and fp16, which checks
the grid, the masks (sequence ends, the local window, query blocks past a sequence) and the online softmax;
on CUDA the same tests run the autotuned kernel in bf16 (`bench/gpu_all.sh` runs the `gpu`-marked one; the
rest autotune every shape they try, so they are for a call with time to spare).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from model import load_classifier, triton_attention
from model.attention import Attention, pick_backend
from model.packing import pack
from model.triton_attention import varlen_attention
from tests.model.triton_util import autotuners_on_cpu

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.bfloat16] if CUDA else [torch.float32, torch.float16]


def qkv(T: int, H: int, D: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, D, generator=g).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [-1, 16, 64])
@pytest.mark.parametrize(
    "lengths", [(1,), (5, 40, 17), (150, 3, 70), (33,) * 6], ids=["one token", "mixed", "long", "equal"]
)
def test_triton_attention_equals_sdpa_on_the_stream(dtype: torch.dtype, window: int, lengths: tuple) -> None:
    batch = pack([[7] * n for n in lengths]).to(DEVICE)
    H, D = 2, 32
    q, k, v = qkv(sum(lengths), H, D, dtype, seed=len(lengths) + window)
    sdpa = Attention("sdpa", window if window >= 0 else 64)  # global: the window is not used
    want = sdpa.attend(q.float(), k.float(), v.float(), sdpa.prepare(batch), local=window >= 0)
    got = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, window)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert got.shape == q.shape and got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= tol


def test_head_dims_the_kernel_cannot_tile_are_refused(tmp_path: Path) -> None:
    q = torch.zeros(4, 2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 24 must be a power of two"):
        varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32, device=DEVICE), 4, -1)
    from tests.checkpoints import make_checkpoint

    odd = make_checkpoint(tmp_path / "odd", hidden=72, heads=3, tokenizer=True)  # head_dim 24
    with pytest.raises(ValueError, match=r"^backend: 'triton' needs a power-of-two head_dim, .* got 24$"):
        load_classifier(odd, device=str(DEVICE), backend="triton")


def test_the_backend_is_chosen_only_when_asked_for(monkeypatch) -> None:
    assert pick_backend(DEVICE) != "triton"
    assert pick_backend(DEVICE, "triton") == "triton"
    if not CUDA:  # outside the interpreter the CPU cannot run it: refused, saying why
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(
            ValueError, match=r"^backend: 'triton' requested, but its kernels need a CUDA device"
        ):
            pick_backend(DEVICE, "triton")


def test_the_network_on_the_triton_backend_gives_the_same_logits(tiny_model_dir: Path) -> None:
    """Global and local (16-token window) layers through the kernel: the logits of the default backend."""
    if CUDA:
        triton_clf = load_classifier(tiny_model_dir, device="cuda", backend="triton", graphs=False)
        plain = load_classifier(tiny_model_dir, device="cuda", graphs=False)
        atol = 0.05
    else:
        triton_clf = load_classifier(tiny_model_dir, device="cpu", backend="triton")
        plain = load_classifier(tiny_model_dir, device="cpu")
        atol = 1e-4
    assert triton_clf.backend == "triton"
    seqs = [[1, *([7 + n % 50] * n), 2] for n in (3, 50, 140, 17)]
    got, want = triton_clf.forward(seqs), plain.forward(seqs)
    assert torch.allclose(got, want, atol=atol * max(1.0, want.abs().max().item())), (got - want).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_backend_replays_in_cuda_graphs(tiny_model_dir: Path) -> None:
    """CUDA: graph buckets capture the kernel (autotuned in the warm-ups) and replay the eager logits."""
    eager = load_classifier(tiny_model_dir, device="cuda", backend="triton", graphs=False)
    graphed = load_classifier(tiny_model_dir, device="cuda", backend="triton", graphs=True)
    assert graphed.runner.graphs is not None, graphed.runner.graph_error
    seqs = [[1, *([7 + n % 50] * n), 2] for n in (3, 50, 140, 17)]
    launched = graphed.runner.launch(seqs)
    assert launched.graphed
    assert torch.allclose(graphed.runner.collect(launched), eager.forward(seqs), atol=1e-2)


@pytest.fixture
def autotuner():
    """CPU: the kernel routed through a real Triton autotuner whose benchmark runs each tile once (nothing
    can be timed in the interpreter) — the CUDA path's grid, keys and every tile size."""
    with autotuners_on_cpu(triton_attention.use_autotuner, triton_attention.autotuned):
        yield


@pytest.mark.parametrize("window", [-1, 64])
@pytest.mark.parametrize("lengths", [(5, 40, 17), (600, 9)], ids=["short", "past SEQ_BIG"])
def test_the_autotuned_path_computes_the_same(autotuner, window: int, lengths: tuple) -> None:
    batch = pack([[7] * n for n in lengths]).to(DEVICE)
    dtype = DTYPES[-1]
    q, k, v = qkv(sum(lengths), 1, 64, dtype, seed=window)
    sdpa = Attention("sdpa", 64)
    want = sdpa.attend(q.float(), k.float(), v.float(), sdpa.prepare(batch), local=window >= 0)
    got = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, window)
    assert (got.float() - want).abs().max().item() <= {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
