"""The fused Triton GEMMs (model/fused.py) against the plain ops, and the network with them on.

Without CUDA the kernels run in Triton's interpreter (fp32 and fp16; the interpreter's bf16 `tl.dot` is
wrong), which checks the index arithmetic — tiles, heads, RoPE pairs, gate rows, the ragged last row tile —
but says nothing about speed. On CUDA the same checks run the compiled, autotuned kernels in bf16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from model import fused, load_classifier
from model.modernbert import apply_rope
from tests.model.triton_util import autotuners_on_cpu, specialization

CUDA = torch.cuda.is_available()  # without it, tests/conftest.py has put Triton in its interpreter
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16] if CUDA else [torch.float32, torch.float16]
ACTS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """fp32: summation order only; fp16/bf16: the output's rounding (the reference is fp32 throughout)."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * max(1.0, scale)


def rand(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape)).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "heads", "head_dim"), [(37, 4, 16), (16, 2, 32), (1, 4, 16), (70, 6, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_rope_is_the_projection_then_neox_rope(
    dtype: torch.dtype, T: int, heads: int, head_dim: int, bias: bool
) -> None:
    torch.manual_seed(T + heads)
    d = heads * head_dim
    x = rand(T, d, dtype=dtype)
    w = rand(3 * d, d, dtype=dtype, scale=d**-0.5)
    b = rand(3 * d, dtype=dtype) if bias else None
    angles = (torch.rand(T, 1, head_dim // 2) * 50).to(DEVICE)  # (T, 1, D/2) as the network passes them
    cos, sin = angles.cos(), angles.sin()

    out = fused.qkv_rope(x, w, b, cos, sin, heads)

    qkv = F.linear(x.float(), w.float(), None if b is None else b.float()).view(T, 3, heads, head_dim)
    want = torch.stack([apply_rope(qkv[:, 0], cos, sin), apply_rope(qkv[:, 1], cos, sin), qkv[:, 2]])
    assert out.shape == (3, T, heads, head_dim) and out.dtype == dtype
    err = (out.float() - want).abs().max().item()
    assert err <= tolerance(dtype, want.abs().max().item()), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize(("T", "d", "inter"), [(37, 64, 96), (5, 32, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_geglu_is_the_projection_then_act_input_times_gate(
    dtype: torch.dtype, activation: str, T: int, d: int, inter: int, bias: bool
) -> None:
    torch.manual_seed(T + inter)
    x = rand(T, d, dtype=dtype)
    w = rand(2 * inter, d, dtype=dtype, scale=d**-0.5)
    b = rand(2 * inter, dtype=dtype) if bias else None

    out = fused.geglu(x, w, b, activation)

    h = F.linear(x.float(), w.float(), None if b is None else b.float())
    want = ACTS[activation](h[:, :inter]) * h[:, inter:]
    assert out.shape == (T, inter) and out.dtype == dtype
    err = (out.float() - want).abs().max().item()
    assert err <= tolerance(dtype, want.abs().max().item()), err


def test_empty_batches_and_shapes_that_do_not_multiply() -> None:
    x = torch.empty(0, 64, device=DEVICE, dtype=DTYPES[0])
    w = rand(192, 64, dtype=DTYPES[0])
    assert fused.geglu(x, w, None, "gelu").shape == (0, 96)
    with pytest.raises(ValueError, match=r"geglu: x \(3, 32\) and W \(192, 64\) do not multiply"):
        fused.geglu(rand(3, 32, dtype=DTYPES[0]), w, None, "gelu")


def test_what_has_no_fused_kernel_is_named() -> None:
    dev, dtype = torch.device(DEVICE), DTYPES[0]
    assert fused.unsupported(dev, dtype, "gelu", 256, 4, 384) is None  # head_dim 64
    assert "hidden_activation 'mish'" in fused.unsupported(dev, dtype, "mish", 256, 4, 384)
    assert "head_dim 24" in fused.unsupported(dev, dtype, "gelu", 96, 4, 384)
    cuda = torch.device("cuda")
    assert "bfloat16 or float16" in fused.unsupported(cuda, torch.float32, "gelu", 256, 4, 384)
    # shapes no block size tiles (they passed the check, then the first launch raised StopIteration)
    assert "half-heads of 48 columns" in fused.unsupported(dev, dtype, "gelu", 384, 4, 384)  # head_dim 96
    assert "intermediate_size 40" in fused.unsupported(dev, dtype, "gelu", 256, 4, 40)


def test_the_kernels_compile_once_for_any_row_count() -> None:
    """A batch's rows M change with every batch: Triton must not specialize on them (divisible by 16, or
    1), or the CUDA graph buckets' and warm-ups' multiples of 16 leave every other count to compile inside
    a timed run. The strides keep their specializations."""
    from model import fused_kernels

    x, w, cs = torch.empty(8, 768), torch.empty(2304, 768), torch.empty(8, 32)
    tiles = dict(M_BIG=False, BM=64, BN=64, BK=64, GROUP_M=8)

    def qkv(M: int) -> list:
        args = (x, w, w, cs, cs, x, M, 768, 32)
        return specialization(fused_kernels.qkv_rope_kernel, *args, K=768, HEADS=12, HALF=32,
                              HAS_BIAS=False, **tiles)  # fmt: skip

    def geglu(M: int) -> list:
        args = (x, w, w, x, M, 768)
        return specialization(fused_kernels.geglu_kernel, *args, K=768, INTER=1152, ACT=0, HAS_BIAS=False,
                              **tiles)  # fmt: skip

    assert qkv(1000) == qkv(1024) == qkv(1) == qkv(8193)
    assert geglu(1000) == geglu(1024) == geglu(1) == geglu(8193)
    assert qkv(1000)[6:9] == [("i32", None), ("i32", "D"), ("i32", "D")]  # M alone left unspecialized
    assert geglu(1000)[4:6] == [("i32", None), ("i32", "D")]


def test_the_autotuner_only_tries_blocks_that_fit() -> None:
    """CUDA's autotuner gets block sizes whose column tile holds whole heads of q, k or v (and divides the
    intermediate width); Triton passes the constexpr arguments as keywords, apart from `named_args`."""
    import triton

    configs = fused.configs(triton)
    base = dict(K=768, M_BIG=True)
    qkv = fused.prune_qkv(configs, {"x_ptr": None}, **base, HEADS=12, HALF=32)
    assert qkv and all(12 % (c.kwargs["BN"] // 32) == 0 and c.kwargs["BN"] % 32 == 0 for c in qkv)
    assert {c.kwargs["BN"] for c in fused.prune_qkv(configs, {}, **base, HEADS=6, HALF=32)} == {32, 64}
    geglu = fused.prune_geglu(configs, {}, **base, INTER=1152)
    assert geglu and all(1152 % c.kwargs["BN"] == 0 for c in geglu)
    assert {c.kwargs["BK"] for c in fused.prune_geglu(configs, {}, K=32, INTER=64, M_BIG=False)} == {32}
    assert fused.prune_geglu(configs, {}, K=100, INTER=1152, M_BIG=False) == []
    for heads, head_dim in ((4, 16), (2, 32), (6, 64)):  # every shape these tests run on CUDA has blocks
        k = heads * head_dim
        assert fused.prune_qkv(configs, {}, K=k, HEADS=heads, HALF=head_dim // 2, M_BIG=False)
    for k, inter in ((64, 96), (32, 64)):
        assert fused.prune_geglu(configs, {}, K=k, INTER=inter, M_BIG=False)


def test_the_network_with_fused_gemms_gives_the_same_logits(tiny_model_dir: Path) -> None:
    """Every layer's Wqkv + RoPE and Wi + GeGLU through the kernels: the same logits as the plain network
    (CPU: fp32 through SDPA, in the interpreter; CUDA: bf16 through the varlen kernel, graphs off)."""
    kw = dict(device=DEVICE, graphs=False) if CUDA else dict(device="cpu")
    plain = load_classifier(tiny_model_dir, **kw)
    fast = load_classifier(tiny_model_dir, fused_gemm=True, **kw)
    assert fast.runner.fused_gemm and fast.info()["fused_gemm"] and not plain.info()["fused_gemm"]
    assert all(layer.attn.fused and layer.mlp.fused for layer in fast.runner.net.model.layers)
    seqs = [[1, *([7 + n % 50] * n), 2] for n in (3, 50, 140, 17)]  # 140: past the 16-token local window
    got, want = fast.forward(seqs), plain.forward(seqs)
    atol = 1e-4 if not CUDA else 0.05 * max(1.0, want.abs().max().item())
    assert torch.allclose(got, want, atol=atol), (got - want).abs().max()


def test_fused_gemms_auto_stay_off_on_the_cpu(tiny_model_dir: Path) -> None:
    """SAFETY_FUSED_GEMM=auto (the default) turns them on for CUDA only: never Triton's interpreter on a CPU
    server, even where it is set up (the tests here)."""
    from model.engine_settings import EngineSettings

    assert EngineSettings().fused_gemm == "auto"
    auto = load_classifier(tiny_model_dir, device="cpu", fused_gemm=None, backend="auto")
    assert not auto.runner.fused_gemm and auto.runner.backend == "sdpa"
    served = EngineSettings(model=str(tiny_model_dir), device="cpu").load()
    assert not served.runner.fused_gemm and served.runner.backend == "sdpa"


@pytest.mark.skipif(CUDA, reason="CUDA: test_fused_gemms_compiled_and_replayed_equal_eager")
def test_torch_compile_traces_the_fused_ops(tiny_model_dir: Path) -> None:
    """The custom ops inside torch.compile's regions (their fake shapes, dynamic T) give the plain logits,
    also for a new batch shape after the first compile (CPU: inductor calls the interpreted kernels)."""
    plain = load_classifier(tiny_model_dir, device="cpu")
    compiled = load_classifier(tiny_model_dir, device="cpu", compile=True, fused_gemm=True)
    for seqs in (
        [[1, *([7 + n % 50] * n), 2] for n in (3, 50, 140, 17)],
        [[1, *([9] * n), 2] for n in (5, 80)],
    ):
        assert torch.allclose(compiled.forward(seqs), plain.forward(seqs), atol=1e-4)


def test_the_runner_refuses_fused_gemms_it_cannot_run(tiny_model_dir: Path, monkeypatch) -> None:
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match=r"^fused_gemm: the fused kernels need a CUDA device, got cpu"):
            load_classifier(tiny_model_dir, device="cpu", fused_gemm=True)
    else:
        with pytest.raises(ValueError, match=r"^fused_gemm: they need bfloat16 or float16"):
            load_classifier(tiny_model_dir, device="cuda", dtype="float32", backend="sdpa", fused_gemm=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fused_gemms_compiled_and_replayed_equal_eager(tiny_model_dir: Path) -> None:
    """CUDA: the custom ops inside torch.compile's regions and inside captured graphs give the eager
    fused logits (the autotuner ran in the warm-ups, before any capture)."""
    eager = load_classifier(tiny_model_dir, device="cuda", graphs=False, fused_gemm=True)
    both = load_classifier(tiny_model_dir, device="cuda", compile=True, graphs=True, fused_gemm=True)
    assert both.runner.graphs is not None, both.runner.graph_error
    seqs = [[1, *([7 + n % 50] * n), 2] for n in (3, 50, 140, 17)]
    launched = both.runner.launch(seqs)
    assert launched.graphed
    got, want = both.runner.collect(launched), eager.forward(seqs)
    assert torch.allclose(got, want, atol=0.02 * max(1.0, want.abs().max().item()))


@pytest.fixture
def autotuners():
    """CPU: the ops routed through real Triton autotuners whose benchmark runs each config once (nothing
    can be timed in the interpreter) — the CUDA path's grid, keys, pruning and every block size."""
    with autotuners_on_cpu(fused.use_autotuners, fused.autotuned):
        yield


@pytest.mark.parametrize("big", [False, True])  # both size classes of M (fused.M_LARGE)
def test_the_autotuned_path_computes_the_same(autotuners, monkeypatch, big: bool) -> None:
    T, K, heads, D, inter = 300, 64, 12, 64, 256  # base's heads, K = 64: the pruning keeps most configs
    if big:
        monkeypatch.setattr(fused, "M_LARGE", T)
    torch.manual_seed(T)
    dtype = DTYPES[-1]
    x = rand(T, K, dtype=dtype)
    w = rand(3 * heads * D, K, dtype=dtype, scale=K**-0.5)
    angles = (torch.rand(T, 1, D // 2) * 50).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    out = fused.qkv_rope(x, w, None, cos, sin, heads)
    qkv = F.linear(x.float(), w.float()).view(T, 3, heads, D)
    want = torch.stack([apply_rope(qkv[:, 0], cos, sin), apply_rope(qkv[:, 1], cos, sin), qkv[:, 2]])
    assert (out.float() - want).abs().max().item() <= tolerance(dtype, want.abs().max().item())
    wi = rand(2 * inter, K, dtype=dtype, scale=K**-0.5)
    h = F.linear(x.float(), wi.float())
    want = F.gelu(h[:, :inter]) * h[:, inter:]
    got = fused.geglu(x, wi, None, "gelu").float()
    assert (got - want).abs().max().item() <= tolerance(dtype, want.abs().max().item())
