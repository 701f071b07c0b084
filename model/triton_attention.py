"""Varlen attention over a packed stream as a Triton kernel with small tiles: the "triton" attention backend.

Why: FA2 (torch's varlen kernel) tiles a sequence in 128 × 128 blocks. A local layer (|i - j| <= 64) needs
129 keys per query, but a 128-row query block spans 3 such key blocks, so on the traffic mix only ~31% of
the local layers' tile work is inside the window (64 × 64 tiles: ~60%; `bench/tiles.py`),
and on an H100 the local layers cost as much as the global ones there (docs/benchmarks.md). 14 of
ModernBERT's 22 layers are local. Whether a Triton kernel's smaller tiles beat FA2's faster inner loop is
for a GPU run to say; until then no default picks this backend (`SAFETY_ATTENTION=triton` does).

The kernel: one program per (block of BM rows of the packed stream, head). FA2's varlen grid is (query
block, sequence, head), sized by `max_seqlen`: on an unsorted pack of the traffic mix ~95% of its programs
find their sequence already ended and exit, on the planner's length-sorted batches ~21% (`bench/tiles.py`);
tiling the stream instead launches only programs with rows to compute, and a block holding the end of one
sequence and the start of the next masks each row to its own sequence's keys. Online softmax in fp32 with
exp2, the softmax scale folded into exp2's argument (one FMA per score). A local block visits only the keys
its rows' windows touch, masked; a global block inside one sequence runs that sequence's whole key blocks
with no mask at all, then the ragged last one masked (30% fewer instructions per key block in the SASS:
`bench/codegen.py`).
On CUDA the autotuner picks the tile per (head dim, window, short/long `max_seqlen`); on the CPU it runs in
Triton's interpreter (tests; TRITON_INTERPRET=1 set before Triton loads). Must not know: weights, packing
beyond `cu_seqlens` and `seq_index`, batching.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

SEQ_BIG = 512  # max_seqlen above which the autotuner keeps a second choice of tiles


def tileable(head_dim: int) -> bool:
    """The kernel tiles a head with tl.arange(0, D): a power of two, at least 16 (tl.dot's smallest K)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _kernel() -> Any:
    from model import fused_kernels

    return fused_kernels.varlen_attention_kernel


@functools.cache
def _tuned() -> Any:
    return autotuned()


def configs(triton: Any) -> list:
    """Tiles the autotuner tries on CUDA: BM query rows × BN keys per step."""
    return [
        triton.Config({"BM": bm, "BN": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in (
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (128, 64, 4, 2),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (64, 32, 4, 3),
        )
    ]


def autotuned(**options: Any) -> Any:
    """The kernel behind a fresh autotuner; `options` go to `triton.autotune` (the tests pass a `do_bench`
    that runs each config once in the interpreter)."""
    import triton

    return triton.autotune(configs=configs(triton), key=["D", "WINDOW", "SEQ_BIG"], **options)(_kernel())


_TUNER: Any = None  # the tests' autotuner for CPU tensors (`use_autotuner`)


def use_autotuner(tuner: Any) -> None:
    """Route CPU (interpreter) calls through this autotuner instead of fixed tiles (tests); None undoes it."""
    global _TUNER
    _TUNER = tuner


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_index: torch.Tensor,
    max_seqlen: int,
    window: int,
) -> torch.Tensor:
    """q, k, v: (T, H, D) on the packed stream; `cu_seqlens` int32 (B+1) and `seq_index` (T,) (each token's
    sequence) on the device, `max_seqlen` on the host (it picks the autotuner's tile class only); `window`
    >= 0 limits keys to |i - j| <= window, -1 is global. -> (T, H, D), softmax scale D^-1/2."""
    T, H, D = q.shape
    if not tileable(D):
        raise ValueError(f"triton attention: head_dim {D} must be a power of two, at least 16")
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    if T == 0:
        return out
    args = (q, k, v, out, cu_seqlens, seq_index, T, H * D, D**-0.5)
    consts = dict(D=D, WINDOW=window, SEQ_BIG=max_seqlen > SEQ_BIG)
    tuner = _tuned() if q.is_cuda else _TUNER
    if tuner is not None:
        tuner[lambda meta: (-(-T // meta["BM"]), H)](*args, **consts)
    else:  # Triton's interpreter
        _kernel()[(-(-T // 16), H)](*args, **consts, BM=16, BN=16)
    return out


def tuned_config() -> str:
    """The tile Triton's autotuner chose last, for the benchmarks."""
    best = getattr(_tuned(), "best_config", None)
    return str(best) if best is not None else "not tuned yet"
