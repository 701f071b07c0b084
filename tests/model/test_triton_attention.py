"""The "triton" attention backend (model/triton_attention.py) against SDPA on the same packed batches, and
"triton_local" (that kernel on the local layers, flash on the global ones).

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
from tests.model.triton_util import autotuners_on_cpu, specialization

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.bfloat16] if CUDA else [torch.float32, torch.float16]


def qkv(T: int, H: int, D: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, D, generator=g).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [-1, 16, 64])
@pytest.mark.parametrize(
    "lengths",
    [(1,), (5, 40, 17), (150, 3, 70), (33,) * 6, (64, 16, 128)],
    ids=["one token", "mixed", "long", "equal", "whole blocks"],
)
def test_triton_attention_equals_sdpa_on_the_stream(dtype: torch.dtype, window: int, lengths: tuple) -> None:
    batch = pack([[7] * n for n in lengths]).to(DEVICE)
    H, D = 2, 32
    q, k, v = qkv(sum(lengths), H, D, dtype, seed=len(lengths) + window)
    sdpa = Attention("sdpa", window if window >= 0 else 64)  # global: the window is not used
    want = sdpa.attend(q.float(), k.float(), v.float(), sdpa.prepare(batch), local=window >= 0)
    got = varlen_attention(q, k, v, batch.cu_seqlens, batch.seq_index, batch.max_seqlen, window)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert got.shape == q.shape and got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= tol


def test_the_kernel_compiles_once_for_any_token_count() -> None:
    """The batch's token count T is the one argument that changes with every batch: Triton must not
    specialize on it (divisible by 16, or 1), or the CUDA graph buckets' and warm-ups' multiples of 16 leave
    every other count to compile inside a timed run. The other arguments keep their specializations."""
    from model import fused_kernels

    def spec(T: int) -> list:
        q = torch.empty(T, 2, 32)
        cu, seq = torch.tensor([0, T], dtype=torch.int32), torch.zeros(T, dtype=torch.int32)
        args = (q, q, q, q, cu, seq, T, 64, 32**-0.5)
        return specialization(fused_kernels.varlen_attention_kernel, *args, D=32, WINDOW=-1, SEQ_BIG=False,
                              BM=64, BN=64)  # fmt: skip

    assert spec(1000) == spec(1024) == spec(1) == spec(4097)
    assert spec(1000)[6] == ("i32", None) and spec(1000)[7] == ("i32", "D")  # T left alone, stride_t not


def test_head_dims_the_kernel_cannot_tile_are_refused(tmp_path: Path) -> None:
    q = torch.zeros(4, 2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 24 must be a power of two"):
        cu, seq = torch.tensor([0, 4], dtype=torch.int32), torch.zeros(4, dtype=torch.long)
        varlen_attention(q, q, q, cu.to(DEVICE), seq.to(DEVICE), 4, -1)
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


def test_triton_local_sends_only_windowed_layers_to_the_kernel() -> None:
    """Local layers whose window cuts a sequence run our kernel; global layers, and local ones whose window
    spans every sequence, go to the flash kernel (recorded here: it needs CUDA, and answers with SDPA)."""
    attn = Attention("triton_local", 16)
    sdpa = Attention("sdpa", 16)
    calls = []

    def flash(q, k, v, cu_q, cu_k, max_q, max_k, window_size):
        calls.append(window_size)
        return sdpa.attend(q, k, v, sdpa.prepare(batch), local=window_size[0] >= 0)

    attn._flash = flash
    batch = pack([[7] * n for n in (5, 40, 17)]).to(DEVICE)
    q, k, v = qkv(batch.num_tokens, 2, 32, DTYPES[0], seed=3)
    ctx = attn.prepare(batch)
    want = sdpa.attend(q, k, v, sdpa.prepare(batch), local=True)
    assert (attn.attend(q, k, v, ctx, local=True) - want).abs().max().item() <= 4e-3
    assert calls == []
    attn.attend(q, k, v, ctx, local=False)
    assert calls == [(-1, -1)]
    batch = pack([[7] * n for n in (5, 17)]).to(DEVICE)  # max_seqlen 17 = window + 1: nothing is cut
    q, k, v = qkv(batch.num_tokens, 2, 32, DTYPES[0], seed=4)
    attn.attend(q, k, v, attn.prepare(batch), local=True)
    assert calls == [(-1, -1), (-1, -1)]


def test_triton_local_needs_a_cuda_flash_kernel() -> None:
    if CUDA:
        assert pick_backend(DEVICE, "triton_local") == "triton_local"
        return
    with pytest.raises(ValueError, match=r"^backend: 'triton_local' runs its global layers on a CUDA flash"):
        pick_backend(DEVICE, "triton_local")


BACKENDS = ["triton", pytest.param("triton_local", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_network_on_the_triton_backend_gives_the_same_logits(tiny_model_dir: Path, backend: str) -> None:
    """Global and local (16-token window) layers through the kernel: the logits of the default backend."""
    if CUDA:
        triton_clf = load_classifier(tiny_model_dir, device="cuda", backend=backend, graphs=False)
        plain = load_classifier(tiny_model_dir, device="cuda", graphs=False)
        atol = 0.05
    else:
        triton_clf = load_classifier(tiny_model_dir, device="cpu", backend=backend)
        plain = load_classifier(tiny_model_dir, device="cpu")
        atol = 1e-4
    assert triton_clf.backend == backend
    seqs = [[1, *([7 + n % 50] * n), 2] for n in (3, 50, 140, 17)]
    got, want = triton_clf.forward(seqs), plain.forward(seqs)
    assert torch.allclose(got, want, atol=atol * max(1.0, want.abs().max().item())), (got - want).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "triton_local"])
def test_triton_backend_replays_in_cuda_graphs(tiny_model_dir: Path, backend: str) -> None:
    """CUDA: graph buckets capture the kernel (autotuned in the warm-ups) and replay the eager logits."""
    eager = load_classifier(tiny_model_dir, device="cuda", backend=backend, graphs=False)
    graphed = load_classifier(tiny_model_dir, device="cuda", backend=backend, graphs=True)
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
    got = varlen_attention(q, k, v, batch.cu_seqlens, batch.seq_index, batch.max_seqlen, window)
    assert (got.float() - want).abs().max().item() <= {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
