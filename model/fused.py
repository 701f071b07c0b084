"""GEMMs with their elementwise epilogues fused: Wqkv + RoPE, and Wi + GeGLU, as Triton kernels.

Why: on an H100 the compiled network spends ~24% of its device time on memory-bound elementwise kernels, of
which RoPE (reading Wqkv's output back, writing q, k, v) and GeGLU (reading Wi's 2 × intermediate output
back, writing the product) are the two largest (19.4 and 19.7 ms of 299 on 2,048 traffic sequences,
docs/benchmarks.md). Applied to the fp32 accumulator before the GEMM writes anything, they cost no traffic.

How, with no weight reordering: each kernel computes two accumulator tiles of the same rows with one shared
input tile — for Wqkv the first and second halves of a group of heads (RoPE's NeoX pairs are x[i] and
x[i + D/2], i.e. the same column of the two tiles), for Wi the input and gate rows of the same intermediate
columns. Both tiles come from one product per K step over W's rows loaded interleaved (a0, b0, a1, …; a
wgmma twice as wide), split after the loop. So the epilogue is elementwise on the two tiles:
    RoPE:  lo' = lo·cos − hi·sin,  hi' = hi·cos + lo·sin  (v tiles are stored as they are)
    GeGLU: h = act(a) · g
and the outputs land in HF's order: q, k, v as (3, T, H, D), h as (T, intermediate).

`qkv_rope` and `geglu` are torch custom ops (opaque to torch.compile, capturable in CUDA graphs). On CUDA the
Triton autotuner picks block sizes per (K, small/large M) on first use — the runner's warm-ups and graph
capture warm-ups do that before any capture. On the CPU they run only in Triton's interpreter
(TRITON_INTERPRET=1, set before the first call), which the tests use with fp16/fp32 (the interpreter's bf16
`tl.dot` is wrong). Triton is imported on first use, never at import.
Must not know: modules, checkpoints, packing, batching, devices policy (the runner decides when to use it).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch

ACTIVATIONS = {
    "gelu": 0,
    "gelu_python": 0,
    "gelu_new": 1,
    "gelu_accurate": 1,
    "gelu_pytorch_tanh": 1,
    "gelu_fast": 1,
    "relu": 2,
    "silu": 3,
    "swish": 3,
}
M_LARGE = 8192  # rows from which the autotuner keeps a second choice of block sizes (the big batches)
# Offsets are int32 in the kernels: 3 × T × d stays below 2^31 up to ~900k tokens a batch at d = 768 (the
# token budget is at most 131,072).


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_missing(device: torch.device, kernels: str) -> str | None:
    """Why Triton kernels cannot run on `device` here (`kernels` names them in the message), or None: they
    need the triton package and CUDA, or Triton's interpreter (tests). model/triton_attention.py's backend
    asks the same."""
    if not has_triton():
        return "the triton package is not installed"
    if device.type != "cuda" and not interpreting():
        return f"{kernels} need a CUDA device, got {device}"
    return None


def unsupported(
    device: torch.device, dtype: torch.dtype, activation: str, hidden: int, heads: int, inter: int
) -> str | None:
    """Why the fused kernels cannot serve this setup (hidden_size, attention heads, intermediate_size), or
    None when they can: some block size the launch can pick must tile both products."""
    if why := triton_missing(device, "the fused kernels"):
        return why
    if activation not in ACTIVATIONS:
        return f"hidden_activation {activation!r} has no fused kernel (supported: {sorted(ACTIVATIONS)})"
    head_dim = hidden // heads
    if head_dim % 16 or hidden % 16:
        return f"head_dim {head_dim} and hidden_size {hidden} must be multiples of 16"
    if device.type == "cuda" and dtype == torch.float32:
        return "they need bfloat16 or float16 (Triton's fp32 dot is TF32)"
    tiles = [(bn, bk) for _, bn, bk, _, _ in TILES] if device.type == "cuda" else INTERPRETER_TILES
    widths = sorted({bn for bn, _ in tiles})
    if not any(_qkv_ok(bn, bk, heads, head_dim // 2, hidden) for bn, bk in tiles):
        return f"no column tile of {widths} holds whole half-heads of {head_dim // 2} columns"
    if not any(inter % bn == 0 and hidden % bk == 0 for bn, bk in tiles):
        return f"intermediate_size {inter} is not a multiple of a column tile of {widths}"
    return None


# ---- the kernels, defined on first use (TRITON_INTERPRET is read when `triton.jit` runs) -----------------


# Block sizes the autotuner tries on CUDA: BM rows × BN columns per accumulator (two accumulators), BK,
# stages, warps; the interpreter takes the widest of 64/32/16 columns that fits, and the same for BK.
TILES = (
    (128, 64, 64, 4, 4),
    (128, 64, 64, 3, 8),
    (128, 128, 64, 3, 8),
    (64, 128, 64, 4, 4),
    (256, 64, 64, 3, 8),
    (128, 32, 64, 4, 4),
    (128, 64, 32, 4, 4),  # K not a multiple of 64 (small models)
    (64, 32, 32, 4, 4),
)
INTERPRETER_TILES = [(bn, bk) for bn in (64, 32, 16) for bk in (64, 32, 16)]


def configs(triton: Any) -> list:
    """TILES as the autotuner's configs."""
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in TILES
    ]


def _kernels() -> tuple[Any, Any]:
    from model import fused_kernels as k

    return k.qkv_rope_kernel, k.geglu_kernel


@functools.cache
def _tuned() -> tuple[Any, Any]:
    """The kernels behind Triton's autotuner (CUDA), keyed by K, the output width and M's size class."""
    return autotuned()


def autotuned(**options: Any) -> tuple[Any, Any]:
    """(qkv_rope, geglu) kernels behind a fresh autotuner; `options` go to `triton.autotune` (the tests pass
    a `do_bench` that runs each config once in the interpreter, where nothing can be timed)."""
    import triton

    qkv, geglu = _kernels()

    tune = lambda key, prune: triton.autotune(  # noqa: E731
        configs=configs(triton), key=key, prune_configs_by={"early_config_prune": prune}, **options
    )
    return (
        tune(["K", "HEADS", "HALF", "M_BIG"], prune_qkv)(qkv),
        tune(["K", "INTER", "M_BIG"], prune_geglu)(geglu),
    )


def prune_qkv(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's configs whose column tile holds whole heads of one of q, k, v (Triton passes the
    positional arguments in `named_args` and the constexpr keywords apart)."""
    a = {**named_args, **kwargs}
    return [c for c in configs if _qkv_ok(c.kwargs["BN"], c.kwargs["BK"], a["HEADS"], a["HALF"], a["K"])]


def prune_geglu(configs: list, named_args: dict, **kwargs) -> list:
    a = {**named_args, **kwargs}
    return [c for c in configs if a["INTER"] % c.kwargs["BN"] == 0 and a["K"] % c.kwargs["BK"] == 0]


def _qkv_ok(bn: int, bk: int, heads: int, half: int, k: int) -> bool:
    return bn % half == 0 and heads % (bn // half) == 0 and k % bk == 0


def _launch(op: int, x: torch.Tensor, grid_cols, fits, args: tuple, consts: dict) -> None:
    """Kernel `op` (0 qkv_rope, 1 geglu) over x's rows: through the autotuner when there is one (CUDA);
    else (the interpreter) with fixed small blocks — the widest of 64/32/16 columns that `fits`, BK
    likewise on K."""
    M, K = x.shape
    consts = dict(consts, M_BIG=M >= M_LARGE, GROUP_M=8)
    tuner = _tuner(x, op)
    if tuner is not None:
        grid = lambda meta: (_cdiv(M, meta["BM"]) * grid_cols(meta["BN"]),)  # noqa: E731
        tuner[grid](*args, **consts)
        return
    bn = next(b for b in (64, 32, 16) if fits(b))
    bk = next(b for b in (64, 32, 16) if K % b == 0)
    _kernels()[op][(_cdiv(M, 16) * grid_cols(bn),)](*args, **consts, BM=16, BN=bn, BK=bk)


_TUNERS: tuple[Any, Any] | None = None  # the tests' autotuners for CPU tensors (`use_autotuners`)


def _tuner(x: torch.Tensor, op: int) -> Any:
    if x.is_cuda:
        return _tuned()[op]
    return _TUNERS[op] if _TUNERS is not None else None


def use_autotuners(tuners: tuple[Any, Any] | None) -> None:
    """Route CPU (interpreter) calls through these autotuners instead of fixed blocks (tests: the CUDA path's
    grid, pruning and keys, every config run once); None restores the fixed blocks."""
    global _TUNERS
    _TUNERS = tuners


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(x: torch.Tensor, w: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{what}: x {tuple(x.shape)} and W {tuple(w.shape)} do not multiply")
    if x.shape[1] % 16:
        raise ValueError(f"{what}: K = {x.shape[1]} is not a multiple of 16")
    if not w.is_contiguous():
        raise ValueError(f"{what}: W must be contiguous (the kernels read its rows with stride K)")
    return x if x.stride(1) == 1 else x.contiguous()


# ---- the ops ---------------------------------------------------------------------------------------------


@torch.library.custom_op("safety::qkv_rope", mutates_args=())
def qkv_rope(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
    heads: int,
) -> torch.Tensor:  # fmt: skip
    """x (T, d) @ Wqkv (3d, d)^T [+ bias], then NeoX RoPE on q and k -> (3, T, H, D) in x's dtype.
    cos, sin: fp32 angles per token, (T, D/2) or any (T, ..., D/2) view with unit last stride."""
    x = _check(x, w, "qkv_rope")
    T, K = x.shape
    D = w.shape[0] // (3 * heads)
    half = D // 2
    out = torch.empty(3, T, heads, D, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    cos, sin = cos.reshape(T, half), sin.reshape(T, half)
    args = (x, w, w if bias is None else bias, cos, sin, out, T, x.stride(0), cos.stride(0))
    consts = dict(K=K, HEADS=heads, HALF=half, HAS_BIAS=bias is not None)
    grid_cols = lambda bn: 3 * heads // (bn // half)  # noqa: E731
    _launch(0, x, grid_cols, lambda b: _qkv_ok(b, 16, heads, half, 16), args, consts)
    return out


@qkv_rope.register_fake
def _(x, w, bias, cos, sin, heads):
    D = w.shape[0] // (3 * heads)
    return x.new_empty(3, x.shape[0], heads, D)


@torch.library.custom_op("safety::geglu", mutates_args=())
def geglu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """act(x @ Wi[:I]^T + b[:I]) · (x @ Wi[I:]^T + b[I:]) -> (T, I) in x's dtype: HF's `act(input) * gate`."""
    x = _check(x, w, "geglu")
    T, K = x.shape
    inter = w.shape[0] // 2
    out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    args = (x, w, w if bias is None else bias, out, T, x.stride(0))
    consts = dict(K=K, INTER=inter, ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None)
    _launch(1, x, lambda bn: inter // bn, lambda b: inter % b == 0, args, consts)
    return out


@geglu.register_fake
def _(x, w, bias, activation):
    return x.new_empty(x.shape[0], w.shape[0] // 2)


def tuned_config(op: str) -> str:
    """The block sizes Triton's autotuner chose last for `op` ("qkv_rope" or "geglu"), for the benchmarks."""
    if not has_triton() or interpreting():
        return "interpreter"
    tuner = _tuned()[0 if op == "qkv_rope" else 1]
    best = getattr(tuner, "best_config", None)
    return str(best) if best is not None else "not tuned yet"
