"""What our Triton kernels compile to on a GPU, without a GPU: every kernel × every autotuner config, built
ahead of time for a CUDA target (default sm_90, the H100) by the installed Triton and its bundled ptxas.

Per (kernel, shape, config) it reports what decides speed before anything runs: registers per thread,
spills (stack and local bytes, and how many spill instructions sit inside a loop of the SASS: those cost
every iteration), shared memory, the tensor-core instruction the dots lowered to (wgmma on Hopper, mma.sync
before), whether the main loop's loads were software-pipelined (async copies), and the resident blocks per
SM those allow. A config that fails to compile would crash Triton's autotuner on the card (it
skips only configs out of resources), so this is also the check that a GPU call will not be spent on one.

The arguments are specialised as Triton's JIT does at launch: pointers and integers divisible by 16 carry
`tt.divisibility = 16` (torch's allocations are 256-byte aligned; strides are multiples of the head width),
the row count M does not (any batch size). Shapes are ModernBERT's (base: hidden 768, 12 heads × 64,
intermediate 1,152; large: 1,024, 16 × 64, 2,624), bf16, no biases, exact GELU, window 64.

    python bench/codegen.py [--shape base,large] [--arch 90] [--json out.json]

Must run without TRITON_INTERPRET (the interpreter replaces `triton.jit`); nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "base": dict(hidden=768, heads=12, head_dim=64, inter=1152),
    "large": dict(hidden=1024, heads=16, head_dim=64, inter=2624),
}
WINDOW = 64
# TTGIR ops of loads issued ahead of their use: cp.async, TMA
ASYNC_LOADS = ("async_copy_global_to_local", "async_tma_copy", "descriptor_load")
ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")  # a SASS instruction's address, as cuobjdump prints it
MMA_SHAPE = re.compile(r"\bHG?MMA\.(\d+x\d+x\d+)")  # HGMMA.64x256x16.F32.BF16, HMMA.16816...
BRANCH = re.compile(r"\bBRA\b[^;]*?0x([0-9a-f]+)")
# per SM, by compute capability: shared memory (bytes; one block may take 1 KiB less) and threads; every one
# of these has 64k 32-bit registers per SM and 255 per thread at most
SM_LIMITS = {80: (167936, 2048), 86: (102400, 1536), 89: (102400, 1536), 90: (233472, 2048)}
REGS_PER_SM = 65536


@dataclass
class Row:
    kernel: str
    shape: str
    case: str
    config: str
    ok: bool
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0  # per thread: stack frame and local memory (register spills)
    loop_spills: int = 0  # spill stores and loads (STL/LDL) inside a loop of the SASS: the costly ones
    loop_instructions: list[int] = field(default_factory=list)  # SASS per iteration, each tensor-core loop
    shared_kib: float = 0.0
    mma: str = ""  # "wgmma", "mma.sync" or "none"
    mma_shape: str = ""  # the main loop's tensor-core instruction, M x N x K (SASS), e.g. 64x256x16
    pipelined: bool = False  # the loop's loads go through async copies (cp.async or TMA)
    blocks_per_sm: int = 0
    seconds: float = 0.0


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [_tool("cuobjdump"), *flags, f.name], capture_output=True, text=True, check=True
        ).stdout


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack + local bytes per thread) from cuobjdump's resource usage of a kernel."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    fn = out[out.index("Function") :]
    n = lambda field: int(m.group(1)) if (m := re.search(rf"{field}:(\d+)", fn)) else 0  # noqa: E731
    return n("REG"), n("STACK") + n("LOCAL")


def sass_loops(cubin: bytes) -> list[list[str]]:
    """The SASS of every loop in the kernel (a loop: a branch back to an earlier address)."""
    sass = cuobjdump(cubin, "-sass").splitlines()
    code = [(int(m.group(1), 16), line) for line in sass if (m := ADDRESS.search(line))]
    loops = sorted(
        {
            (int(b.group(1), 16), at)
            for at, line in code
            if (b := BRANCH.search(line)) and int(b.group(1), 16) < at
        }
    )
    return [[line for at, line in code if lo <= at <= hi] for lo, hi in loops]


def loop_stats(cubin: bytes) -> tuple[int, list[int], str]:
    """(spill instructions, STL/LDL, inside loops; SASS instructions per iteration of each loop that holds
    tensor-core instructions; the first such loop's tensor-core instruction shape). Spills around the main
    loop cost a few hundred cycles per tile; inside it, every iteration pays. Per-iteration counts are the
    non-MMA work a tile step issues (softmax, masks, address arithmetic), which competes with the tensor
    cores for issue slots."""
    loops = sass_loops(cubin)
    spills = sum(bool(re.search(r"\b(STL|LDL)\b", line)) for body in loops for line in body)
    mma_loops = [body for body in loops if any(MMA_SHAPE.search(line) for line in body)]
    shape = (
        next((m.group(1) for line in mma_loops[0] if (m := MMA_SHAPE.search(line))), "") if mma_loops else ""
    )
    return spills, [len(body) for body in mma_loops], shape


def build(fn: Any, args: dict[str, Any], consts: dict[str, Any], warps: int, stages: int, arch: int) -> Any:
    """Compile `fn` for sm_`arch` with runtime `args` given as Triton types ("*bf16", "i32", ...) or as
    (type, divisible_by_16) pairs, and `consts` as the constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for name, spec in args.items():
        kind, aligned = spec if isinstance(spec, tuple) else (spec, spec.startswith("*"))
        signature[name] = kind
        if aligned:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in consts})
    missing = set(names) - set(signature)
    assert not missing, f"{fn.__name__}: no value for {sorted(missing)}"
    src = ASTSource(
        fn=fn,
        signature={n: signature[n] for n in names},
        constexprs={(names.index(n),): v for n, v in consts.items()},
        attrs=attrs,
    )
    options = dict(num_warps=warps, num_stages=stages)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def inspect(kernel: Any, warps: int, arch: int) -> dict[str, Any]:
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    regs, spill = resources(kernel.asm["cubin"])
    spills_in_loops, per_iteration, shape = loop_stats(kernel.asm["cubin"])
    shared = kernel.metadata.shared
    smem_per_sm, threads_per_sm = SM_LIMITS.get(arch, SM_LIMITS[90])
    threads = 32 * warps
    fits = [threads_per_sm // threads, REGS_PER_SM // max(1, regs * threads)]
    if shared:
        fits.append(smem_per_sm // shared)
    return dict(
        registers=regs,
        spill_bytes=spill,
        loop_spills=spills_in_loops,
        loop_instructions=per_iteration,
        shared_kib=round(shared / 1024, 1),
        mma="wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none",
        mma_shape=shape,
        pipelined=any(op in ttgir for op in ASYNC_LOADS),
        blocks_per_sm=min(fits) if shared <= smem_per_sm - 1024 else 0,
    )


def cases(shape: str) -> list[tuple[str, Any, str, dict[str, Any], dict[str, Any], list]]:
    """(kernel name, jit function, case, runtime args, constexprs, configs) for every kernel at `shape`."""
    import triton

    from model import fused, fused_kernels, triton_attention

    s = SHAPES[shape]
    K, H, D, inter = s["hidden"], s["heads"], s["head_dim"], s["inter"]
    out = []
    gemm = dict(M_BIG=True, GROUP_M=8)
    qkv_args = {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
        "out_ptr": "*bf16", "M": ("i32", False), "stride_x": ("i32", K % 16 == 0),
        "stride_cs": ("i32", (D // 2) % 16 == 0),
    }  # fmt: skip
    qkv_consts = dict(K=K, HEADS=H, HALF=D // 2, HAS_BIAS=False, **gemm)
    keep = fused.prune_qkv(fused.configs(triton), {}, **qkv_consts)
    case = f"K={K} heads={H}x{D}"
    out.append(("qkv_rope", fused_kernels.qkv_rope_kernel, case, qkv_args, qkv_consts, keep))
    geglu_args = {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", "M": ("i32", False),
        "stride_x": ("i32", K % 16 == 0),
    }  # fmt: skip
    geglu_consts = dict(K=K, INTER=inter, ACT=fused.ACTIVATIONS["gelu"], HAS_BIAS=False, **gemm)
    keep = fused.prune_geglu(fused.configs(triton), {}, **geglu_consts)
    out.append(("geglu", fused_kernels.geglu_kernel, f"K={K} inter={inter}", geglu_args, geglu_consts, keep))
    attn_args = {
        "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "cu_ptr": "*i32",
        "seq_ptr": "*i64", "T": ("i32", False), "stride_t": ("i32", H * D % 16 == 0),
        "sm_scale": ("fp32", False),
    }  # fmt: skip
    for window in (-1, WINDOW):
        for big in (False, True):
            consts = dict(D=D, WINDOW=window, SEQ_BIG=big)
            case = f"{'global' if window < 0 else f'window {window}'}, max_seqlen {'>' if big else '<='} 512"
            kernel = fused_kernels.varlen_attention_kernel
            out.append(("attention", kernel, case, attn_args, consts, triton_attention.configs(triton)))
    return out


def run(shapes: list[str], arch: int) -> list[Row]:
    rows = []
    seen: set[tuple] = set()
    for shape in shapes:
        for name, fn, case, args, consts, configs in cases(shape):
            for cfg in configs:
                tiles = " ".join(f"{k}{v}" for k, v in cfg.kwargs.items())
                label = f"{tiles} w{cfg.num_warps} s{cfg.num_stages}"
                # SEQ_BIG only keys the autotuner: the code is the same, so compile it once per config
                key = (name, shape, case.split(",")[0], label)
                if name == "attention" and key in seen:
                    continue
                seen.add(key)
                row = Row(kernel=name, shape=shape, case=case.split(",")[0] if name == "attention" else case,
                          config=label, ok=False)  # fmt: skip
                t0 = time.perf_counter()
                try:
                    kernel = build(fn, args, {**consts, **cfg.kwargs}, cfg.num_warps, cfg.num_stages, arch)
                    for k, v in inspect(kernel, cfg.num_warps, arch).items():
                        setattr(row, k, v)
                    row.ok = True
                except Exception as e:  # reported per config, the run goes on
                    row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                row.seconds = round(time.perf_counter() - t0, 2)
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(r: Row) -> str:
    head = f"{r.kernel:<9} {r.shape:<5} {r.case:<22} {r.config:<26}"
    if not r.ok:
        return f"{head} FAILED {r.error}"
    return (
        f"{head} regs {r.registers:>3}  spill {r.spill_bytes:>4} B ({r.loop_spills} in loops)  "
        f"smem {r.shared_kib:>6.1f} KiB  "
        f"{r.mma} {r.mma_shape:<10} {'pipelined' if r.pipelined else 'NOT pipelined':<13}  "
        f"{r.blocks_per_sm} blocks/SM  "
        f"loop {'/'.join(map(str, r.loop_instructions))} instr  ({r.seconds:.1f} s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="base", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--arch", type=int, default=90, help=f"compute capability × 10, of {sorted(SM_LIMITS)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("codegen: unset TRITON_INTERPRET (the interpreter replaces triton.jit)")
    import triton

    print(f"# Triton {triton.__version__}, target sm_{args.arch}", flush=True)
    rows = run(args.shape.split(","), args.arch)
    failed = [r for r in rows if not r.ok]
    print(f"# {len(rows) - len(failed)} of {len(rows)} compiled")
    if args.json:
        doc = {"triton": triton.__version__, "arch": args.arch, "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
