"""One-call GPU benchmark: parity first, then the five gpu-anchor.md workloads for HF and for us, same run.

Self-contained for a single `device` call (the GPU image has torch, transformers, tokenizers, safetensors;
no flash-attn, no celery). Steps:
  1. environment (card, torch, transformers);
  2. a ModernBERT-base-shape random checkpoint (7 labels, multi-label, mean pooling) written with
     `save_pretrained` + our tokenizer file, loaded by HF (bf16, SDPA) and by us (bf16, auto backend);
  3. parity: bf16 logits of both against HF fp32 on mixed lengths (1..2000 tokens, one call); our error must
     stay within 2x HF-bf16's own error + 0.02 (the bound tests/model/test_compile_gpu.py states);
  4. each workload: HF arrival order and length-sorted (padded batches of the anchor's size), ours eager and
     ours compiled; real tokens/s, peak GiB, ratios measured here;
  4b. our Triton kernels, where Triton can run: the fused GEMMs (model/fused.py, SAFETY_FUSED_GEMM) alone,
     Wqkv + RoPE and Wi + GeGLU at 4k / 16k / 131k tokens against cuBLAS + the eager and the compiled
     elementwise ops (ms, TFLOP/s, largest difference, the autotuner's blocks); then four engines at the
     same token budget — fused GEMMs and Triton attention (model/triton_attention.py,
     SAFETY_ATTENTION=triton), each eager and compiled: parity against HF fp32 (same bound), our rows again
     as a ratio to the plain engine's above, and the compiled ones' profiles in step 7;
  5. budget sweep: ours eager on traffic and long_var at token budgets around the probed default, and at
     12,288 tokens, where every batch replays a CUDA graph (the share of graphed batches is printed);
  6. no host-device sync while a batch is packed, copied and queued (sync-debug mode "error");
     CUDA graphs (model/graphs.py): replayed vs ungraphed logits, latency of one 128-token item (host launch
     time vs the whole forward) and small-batch calls (1, 4, 16, 64 traffic items) with graphs off, with the
     first bucket kind (`max_seqlen` = tokens, up to 4,096; capture time and pool reported) and with today's
     buckets keyed by tokens, `max_seqlen` and slots (up to 16,384);
     the attention kernel alone: local (window 64) vs global on short, traffic and 8192-token batches,
     flash (FA2) and our Triton kernel (with its largest difference from flash and its tile);
  7. profile: the top device kernels of ours eager (and compiled) on part of the traffic mix;
  8. memory: peak device memory above the loaded baseline for one input of 512 ... 8192 tokens and for one
     full default token budget of 512-token inputs, ours and HF; GiB per 1k tokens shows linear growth;
  9. a probe, last (a kernel fault would end the process's CUDA context): cuDNN's ragged attention on the
     same packs as step 6, global, against the flash kernel (time and largest difference);
 10. a markdown table on stdout and JSON in $OUT (or --out), rewritten after every step.
Every step is guarded: an exception is printed, recorded under "errors" and the next step runs, so one
failing step (a compile error, say) never costs the rest of a GPU call; if our engine fails to load or run
with the default kernel, it is measured again with the SDPA backend.
`--smoke` runs everything tiny on the CPU so the script itself is checked without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.buckets import FIRST_BUCKETS
from bench.workloads import (
    CLS,
    SEP,
    SHAPES,
    Workload,
    anchor_workloads,
    hf_run,
    memory_cases,
    padded,
    write_checkpoint,
)

TINY = {**SHAPES["tiny"], "local_attention": 16}  # --smoke: short enough sequences still see local layers


def log(*a) -> None:
    print(*a, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def parity(hf32, hf16, clf, device, lengths) -> dict:
    g = torch.Generator().manual_seed(7)
    seqs = [[CLS, *torch.randint(5, 50000, (max(n - 2, 0),), generator=g).tolist(), SEP][:n] for n in lengths]
    ids, mask = padded(seqs, list(range(len(seqs))), device)
    with torch.inference_mode():
        ref = hf32(input_ids=ids, attention_mask=mask).logits.float().cpu()
        hf_bf16 = hf16(input_ids=ids, attention_mask=mask).logits.float().cpu()
    ours = clf.forward(seqs)
    scale = ref.abs().max().item()
    e_hf, e_ours = (hf_bf16 - ref).abs().max().item(), (ours - ref).abs().max().item()
    bound = 2 * e_hf + 0.02 * max(1.0, scale)
    return {"max_abs_logit": scale, "hf_bf16_err": e_hf, "ours_err": e_ours, "bound": bound,
            "ours_vs_hf_bf16": (ours - hf_bf16).abs().max().item(), "ok": e_ours <= bound}  # fmt: skip


def memory(hf16, clf, device, lengths: list[int]) -> list[dict]:
    """Peak allocated memory above the baseline per case (ascending single inputs, then a full budget)."""
    cases = memory_cases(lengths, clf.limits.max_batch_tokens)
    rows = []
    for engine in ("ours", "hf"):
        for case, seqs in cases:
            reset_peak(device)
            base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            try:
                if engine == "ours":
                    clf.run_windows(seqs)
                else:
                    with torch.inference_mode():
                        hf16(*padded(seqs, list(range(len(seqs))), device))
                sync(device)
                gib = (
                    (torch.cuda.max_memory_allocated() - base) / 2**30
                    if device.type == "cuda"
                    else float("nan")
                )
            except torch.OutOfMemoryError:
                gib = float("inf")
                torch.cuda.empty_cache()
            tokens = sum(map(len, seqs))
            rows.append({"engine": engine, "case": case, "tokens": tokens, "peak_gib": gib})
            log(f"memory {engine:<5} {case:<28} {tokens:>7} tokens  peak {gib:7.3f} GiB  "
                f"{gib / tokens * 1e3 * 1024:8.2f} MiB/1k tokens")  # fmt: skip
    return rows


class Report:
    """The run's JSON, rewritten after every step; `step` keeps one failing step from ending the run."""

    def __init__(self, out_dir: str, data: dict) -> None:
        self.path = Path(out_dir) / "gpu.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = data
        self.data.setdefault("errors", {})
        self.data.setdefault("step_s", {})

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    @contextlib.contextmanager
    def step(self, name: str):
        t0 = time.perf_counter()
        log(f"# -- {name}")
        try:
            yield
        except Exception as e:  # recorded and reported; the next step still runs
            traceback.print_exc()
            self.data["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"# !! {name} failed: {type(e).__name__}: {e}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            self.data["step_s"][name] = round(time.perf_counter() - t0, 2)
            self.save()


def workload_row(wl: Workload, hf16, engines, device) -> dict:
    seqs = wl.sequences()
    row = {"workload": wl.name, "sequences": len(seqs), "tokens": wl.tokens}
    hf_run(hf16, seqs[: wl.hf_batch], wl.hf_batch, True, device)  # warm-up batch
    for label, sort in (("hf_arrival", False), ("hf_sorted", True)):
        reset_peak(device)
        try:
            sec = timed(lambda s=seqs, b=wl.hf_batch, o=sort: hf_run(hf16, s, b, o, device), device)
            row[label] = wl.tokens / sec
            row[label + "_gib"] = peak_gib(device)
        except torch.OutOfMemoryError:
            row[label] = float("nan")
            torch.cuda.empty_cache()
    engine_rates(wl, seqs, engines, device, row)
    best = max(row.get("ours_compiled", 0.0), row.get("ours_eager", 0.0))
    k = {key: row.get(key, 0.0) / 1e3 for key in ("hf_arrival", "hf_sorted", "ours_eager", "ours_compiled")}
    log(f"{wl.name:<12} HF arrival {k['hf_arrival']:8.1f}k  HF sorted {k['hf_sorted']:8.1f}k  "
        f"ours eager {k['ours_eager']:8.1f}k  ours compiled {k['ours_compiled']:8.1f}k  "
        f"best/HF-sorted {best / row['hf_sorted']:.2f}x  "
        f"peak GiB ours {row.get('ours_eager_gib', 0):.2f}  GPU busy eager "
        f"{row.get('ours_eager_device_busy', 0):.0%} compiled "
        f"{row.get('ours_compiled_device_busy', 0):.0%}")  # fmt: skip
    return row


def engine_rates(wl: Workload, seqs: list[list[int]], engines, device, row: dict) -> None:
    """Our engines on one workload: tokens/s, peak GiB and the GPU's busy share, into `row` (label keys)."""
    for label, engine in engines:
        try:  # one engine failing on this workload (a compile error, say) keeps HF's and the other's numbers
            engine.run_windows(seqs[: min(len(seqs), 64)])  # warm-up
            reset_peak(device)
            busy = engine.runner.device_seconds
            sec = timed(lambda e=engine, s=seqs: e.run_windows(s), device)
            busy = (engine.runner.device_seconds - busy) / sec  # CUDA events: the GPU's share of the time
        except Exception as e:
            row[label + "_error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"# {wl.name}: {label} failed: {row[label + '_error'][:300]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row[label] = wl.tokens / sec
        row[label + "_gib"] = peak_gib(device)
        row[label + "_device_busy"] = busy


def fused_kernel_rows(config, tokens: list[int], device, dtype) -> list[dict]:
    """model/fused.py's two GEMMs alone, against what the network runs without them: cuBLAS + the eager
    elementwise ops, and cuBLAS + torch.compile's fused elementwise kernel. ms per call (CUDA events),
    TFLOP/s of the GEMM, largest difference to the compiled plain path, and the block sizes the autotuner
    chose (fused.tuned_config)."""
    import torch.nn.functional as F

    from model import fused
    from model.modernbert import activation, apply_rope

    d, heads, inter, D = (
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.head_dim,
    )
    g = torch.Generator(device=device).manual_seed(3)
    w_qkv = torch.randn(3 * d, d, device=device, generator=g).mul(d**-0.5).to(dtype)
    w_i = torch.randn(2 * inter, d, device=device, generator=g).mul(d**-0.5).to(dtype)
    act_name = config.hidden_activation
    act = activation(act_name)

    def plain_qkv(x, cos, sin):
        T = x.shape[0]
        qkv = F.linear(x, w_qkv).view(T, 3, heads, D)  # (T, 3, H, D)
        return apply_rope(qkv[:, :2].transpose(0, 1), cos, sin), qkv[:, 2].contiguous()

    def plain_mlp(x):
        a, gate = F.linear(x, w_i).chunk(2, dim=-1)
        return act(a) * gate

    compiled_qkv = torch.compile(plain_qkv, dynamic=True)
    compiled_mlp = torch.compile(plain_mlp, dynamic=True)
    rows = []
    for T in tokens:
        x = torch.randn(T, d, device=device, generator=g).to(dtype)
        angles = torch.rand(T, 1, D // 2, device=device, generator=g) * 100
        cos, sin = angles.cos(), angles.sin()
        with torch.inference_mode():
            qk, v = compiled_qkv(x, cos, sin)
            qkv = fused.qkv_rope(x, w_qkv, None, cos, sin, heads)
            qkv_diff = max((qkv[:2] - qk).abs().max().item(), (qkv[2] - v).abs().max().item())
            mlp_diff = (fused.geglu(x, w_i, None, act_name) - compiled_mlp(x)).abs().max().item()
            qkv_args = (x, cos, sin)
            cases = {
                "qkv+rope": (3 * d, qkv_diff, {
                    "cublas+eager": lambda a=qkv_args: plain_qkv(*a),
                    "cublas+compiled": lambda a=qkv_args: compiled_qkv(*a),
                    "fused": lambda a=qkv_args: fused.qkv_rope(a[0], w_qkv, None, a[1], a[2], heads),
                }),
                "wi+geglu": (2 * inter, mlp_diff, {
                    "cublas+eager": lambda x=x: plain_mlp(x),
                    "cublas+compiled": lambda x=x: compiled_mlp(x),
                    "fused": lambda x=x: fused.geglu(x, w_i, None, act_name),
                }),
            }  # fmt: skip
            for op, (n_out, diff, paths) in cases.items():
                row = {"op": op, "tokens": T, "max_diff_vs_compiled": diff}
                for path, fn in paths.items():
                    row[f"{path}_ms"] = ms = cuda_ms(fn) if device.type == "cuda" else timed(fn, device) * 1e3
                    row[f"{path}_tflops"] = 2.0 * T * d * n_out / ms / 1e9  # the GEMM's FLOPs
                row["fused_config"] = fused.tuned_config("qkv_rope" if op == "qkv+rope" else "geglu")
                rows.append(row)
                log(f"fused {op:<9} {T:>7} tokens: cuBLAS+eager {row['cublas+eager_ms']:7.3f} ms  "
                    f"cuBLAS+compiled {row['cublas+compiled_ms']:7.3f} ms  fused {row['fused_ms']:7.3f} ms "
                    f"({row['fused_tflops']:.0f} TFLOP/s)  max |Δ| {diff:.4f}  "
                    f"{row['fused_config']}")  # fmt: skip
    return rows


def budget_sweep(clf, workloads: list[Workload], budgets: list[int], device, rows: list[dict]) -> None:
    """Ours eager at several token budgets (same classifier, limits swapped): tokens/s and peak GiB appended
    to `rows` as they are measured (an out-of-memory at the largest budget keeps the rest)."""
    default = clf.limits
    try:
        for wl in workloads:
            seqs = wl.sequences()
            for budget in budgets:
                clf.limits = dataclasses.replace(default, max_batch_tokens=max(budget, default.max_tokens))
                clf.run_windows(seqs[:64])
                reset_peak(device)
                launches, replays = clf.runner.launches, clf.runner.replays
                sec = timed(lambda s=seqs: clf.run_windows(s), device)
                batches = clf.runner.launches - launches
                graphed = (clf.runner.replays - replays) / batches
                peak = peak_gib(device)
                rows.append({"workload": wl.name, "budget": budget, "tokens_per_s": wl.tokens / sec,
                             "peak_gib": peak, "batches": batches, "graphed": graphed})  # fmt: skip
                log(f"budget {budget:>7} {wl.name:<10} {wl.tokens / sec / 1e3:8.1f}k tok/s  "
                    f"peak {peak:6.2f} GiB  {batches} batches, {graphed:.0%} graphed")  # fmt: skip
    finally:
        clf.limits = default


def latency(clf, device, repeat: int = 50) -> dict:
    """One 128-token item: median host time to launch (pack, copy, queue every kernel) and to the logits
    on the host. Launch close to the total means the latency path is launch-bound (CUDA graphs would pay)."""
    seq = [[CLS, *([7] * 126), SEP]]
    for _ in range(5):
        clf.forward(seq)
    launch, total = [], []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = clf.launch(seq)
        t1 = time.perf_counter()
        clf.collect(out)
        t2 = time.perf_counter()
        launch.append(t1 - t0)
        total.append(t2 - t0)
    return {"launch_ms": statistics.median(launch) * 1e3, "total_ms": statistics.median(total) * 1e3}


@contextlib.contextmanager
def graphs_off(clf):
    """The classifier with its CUDA graphs set aside (every batch launched kernel by kernel)."""
    saved = clf.runner.graphs
    clf.runner.graphs = None
    try:
        yield clf
    finally:
        clf.runner.graphs = saved


@contextlib.contextmanager
def graph_buckets(clf, shapes):
    """The classifier replaying graphs captured for `shapes` instead of its own (restored after)."""
    saved = clf.runner.graphs, clf.runner.graph_error
    try:
        if not clf.runner.capture_graphs(shapes):
            raise RuntimeError(f"capture failed: {clf.runner.graph_error}")
        yield clf
    finally:
        clf.runner.graphs, clf.runner.graph_error = saved
        torch.cuda.empty_cache()


def small_batches(clf, seqs: list[list[int]], device, sizes=(1, 4, 16, 64), calls: int = 100) -> list[dict]:
    """Back-to-back `forward` calls of 1, 4, 16, 64 traffic items (each waits for its logits, as one scheduler
    batch does): calls/s and tokens/s."""
    rows = []
    for size in sizes:
        batches = [[seqs[(i * size + j) % len(seqs)] for j in range(size)] for i in range(calls)]
        clf.forward(batches[0])
        sec = timed(lambda b=batches: [clf.forward(x) for x in b], device)
        tokens = sum(len(s) for b in batches for s in b)
        rows.append({"items": size, "calls_per_s": calls / sec, "ms_per_call": sec / calls * 1e3,
                     "tokens_per_s": tokens / sec})  # fmt: skip
    return rows


def cuda_ms(fn, repeat: int = 10) -> float:
    """Milliseconds per call of `fn` on the current stream (CUDA events; one untimed call first)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def attention_kernels(window: int, cudnn: bool = False, heads: int = 12, head_dim: int = 64) -> list[dict]:
    """The varlen kernel alone, local (window, window) vs global, on packs of one length mix: ms per call
    and TFLOP/s counted as full attention (4 S^2 D per head): whether local layers skip far key blocks.
    `cudnn`: instead, cuDNN's packed (ragged) attention on the same packs, global only (it takes no window),
    with its largest difference from the flash kernel's output — newer torch releases prefer it to flash for
    varlen attention on Hopper, and the global layers (8 of 22) could use it. A probe: run it last, as a
    kernel fault would end the process's CUDA context."""
    from bench.workloads import anchor_workloads
    from model.planner import plan_batches

    traffic = anchor_workloads()["traffic"].lengths
    # the engine's batches are length-sorted (model/planner.py): the traffic mix's middle one, as it runs
    batches = plan_batches(traffic, 131072, 2048)
    planned = [traffic[i] for i in batches[len(batches) // 2]]
    mixes = {"1024 x 128": [128] * 1024, "traffic[:2048]": traffic[:2048],
             f"traffic batch ({len(planned)})": planned, "16 x 8192": [8192] * 16}  # fmt: skip
    rows = []
    for name, lengths in mixes.items():
        rows += (cudnn_rows if cudnn else flash_rows)(name, lengths, window, heads, head_dim)
        if not cudnn:
            rows += triton_rows(name, lengths, window, heads, head_dim)
    return rows


def _pack(lengths: list[int], heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 q, k, v (T, H, D) and int32 offsets for a pack of `lengths`."""
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(T, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v, cu


def flash_rows(name: str, lengths: list[int], window: int, heads: int, head_dim: int) -> list[dict]:
    from torch.nn.attention.varlen import varlen_attn

    q, k, v, cu = _pack(lengths, heads, head_dim)
    S, flops = max(lengths), sum(4 * n * n * head_dim * heads for n in lengths)
    rows = []
    for label, w in (("global", -1), ("local", window)):
        ms = cuda_ms(lambda w=w: varlen_attn(q, k, v, cu, cu, S, S, window_size=(w, w)))
        rows.append(
            {"mix": name, "kind": label, "tokens": sum(lengths), "ms": ms, "full_tflops": flops / ms / 1e9}
        )
        log(f"attention {name:<16} {label:<6} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s (as full)")
    return rows


def triton_rows(name: str, lengths: list[int], window: int, heads: int, head_dim: int) -> list[dict]:
    """model/triton_attention.py's kernel on the same packs, global and local, with its largest difference
    from the flash kernel's output and the tile the autotuner chose."""
    from torch.nn.attention.varlen import varlen_attn

    from model import fused, triton_attention

    if not fused.has_triton():
        return []
    q, k, v, cu = _pack(lengths, heads, head_dim)
    seq = torch.repeat_interleave(
        torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda")
    )
    S, flops = max(lengths), sum(4 * n * n * head_dim * heads for n in lengths)
    rows = []
    for label, w in (("global", -1), ("local", window)):
        try:
            fn = lambda w=w: triton_attention.varlen_attention(q, k, v, cu, seq, S, w)  # noqa: E731
            ref = varlen_attn(q, k, v, cu, cu, S, S, window_size=(w, w))
            diff = float((fn().float() - ref.float()).abs().max())
            ms = cuda_ms(fn)
        except Exception as e:  # a compile error on this card: say so, keep the other rows
            log(f"attention {name:<16} triton {label}: failed ({type(e).__name__}: {str(e)[:300]})")
            continue
        tile = triton_attention.tuned_config()
        tflops = flops / ms / 1e9
        rows.append({"mix": name, "kind": f"triton {label}", "tokens": sum(lengths), "ms": ms,
                     "full_tflops": tflops, "max_abs_diff_vs_flash": diff, "tile": tile})  # fmt: skip
        log(f"attention {name:<16} triton {label:<6} {ms:8.3f} ms  {tflops:7.1f} TFLOP/s (as full)  "
            f"max |Δ| vs flash {diff:.4f}  {tile}")  # fmt: skip
    return rows


def cudnn_rows(name: str, lengths: list[int], window: int, heads: int, head_dim: int) -> list[dict]:
    from torch.nn.attention.varlen import varlen_attn

    q, k, v, cu = _pack(lengths, heads, head_dim)
    S, flops = max(lengths), sum(4 * n * n * head_dim * heads for n in lengths)

    def cudnn() -> torch.Tensor:
        """cuDNN's ragged attention on (T, H, D) with offsets, as newer torch's varlen_attn calls it."""
        out = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, S, S, False, 0.0, False, False)
        return out[0]

    try:
        diff = float((cudnn().float() - varlen_attn(q, k, v, cu, cu, S, S).float()).abs().max())
        ms = cuda_ms(cudnn)
    except Exception as e:  # not in this torch or cuDNN: say so
        log(f"attention {name:<16} cudnn global: unavailable ({type(e).__name__}: {str(e)[:200]})")
        return []
    log(f"attention {name:<16} cudnn global {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s (as full)  "
        f"max |Δ| vs flash {diff:.4f}  (cuDNN {torch.backends.cudnn.version()})")  # fmt: skip
    return [{"mix": name, "kind": "cudnn global", "tokens": sum(lengths), "ms": ms,
             "full_tflops": flops / ms / 1e9, "max_abs_diff_vs_flash": diff}]  # fmt: skip


def profile(clf, seqs: list[list[int]], device, rows: int = 12) -> str:
    """Top device kernels (self time) of one `run_windows` over `seqs`."""
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clf.run_windows(seqs[:64])
    with torch.profiler.profile(activities=acts) as prof:
        clf.run_windows(seqs)
        sync(device)
    avg = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()
    for key in (*keys, "self_cpu_time_total"):
        try:
            return avg.table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
    return avg.table(row_limit=rows)


# Steps a call may leave out (--skip) when its device time is short: what earlier runs measured already.
OPTIONAL = ("triton", "attention", "budget", "nosync", "graphs", "profiles", "memory", "cudnn")


# Our Triton kernels as engine variants: (label, load_classifier options, compiled). Each row is compared with
# the plain engine of the same compile mode measured above in this run.
TRITON_VARIANTS = (
    ("fused_eager", {"fused_gemm": True}, False),
    ("fused_compiled", {"fused_gemm": True}, True),
    ("triton_attn_eager", {"backend": "triton"}, False),
    ("triton_attn_compiled", {"backend": "triton"}, True),
    ("triton_local_compiled", {"backend": "triton_local"}, True),  # ours on local layers, FA2 on global
)


def triton_steps(rep, args, ckpt, config, opts, hf32, hf16, lengths, workloads, rows, device, dtype) -> list:
    """Our Triton kernels, where Triton can run: model/fused.py's GEMMs (SAFETY_FUSED_GEMM) alone, then the
    network with them and with model/triton_attention.py's attention (SAFETY_ATTENTION=triton, and
    triton_local: ours on the local layers only), eager and compiled: parity against HF fp32 (the same
    bound), and our rows again, each against the plain engine's row measured above in this run. Returns the
    engines, for the profile."""
    from model import fused, load_classifier

    out = rep.data
    c = config
    why = fused.unsupported(
        device, dtype, c.hidden_activation, c.hidden_size, c.num_attention_heads, c.intermediate_size
    )
    if why is not None:
        out["triton"] = f"skipped: {why}"
        log(f"# Triton kernels: skipped ({why})")
        return []
    with rep.step("fused GEMMs: kernels"):
        tokens = [40] if args.smoke else [4096, 16384, 131072]
        out["fused_kernels"] = fused_kernel_rows(config, tokens, device, dtype)
    engines = []
    short = [n for n in lengths if n <= 129] if args.smoke else lengths  # smoke: Triton's interpreter
    probe = [[CLS, *range(7, 7 + (40 if args.smoke else 300)), SEP], [CLS, 7, 8, SEP]]
    for label, extra, compiled in TRITON_VARIANTS:
        if (compiled and args.no_compile) or label not in args.triton_variants.split(","):
            continue
        with rep.step(f"triton: {label} engine + parity"):
            t = time.perf_counter()
            try:
                engine = load_classifier(
                    ckpt, **{**opts, **extra}, compile=(args.compile_mode or True) if compiled else False
                )
            except ValueError as e:  # e.g. triton_local without a CUDA flash kernel for its global layers
                out.setdefault("triton_skipped", {})[label] = str(e)
                log(f"# {label}: skipped ({e})")
                continue
            if compiled:
                engine.warmup()
            out.setdefault("triton_load_s", {})[label] = load_s = time.perf_counter() - t
            out.setdefault("triton_parity", {})[label] = p = parity(hf32, hf16, engine, device, short)
            log(f"# {label}: loaded in {load_s:.1f} s; parity vs HF fp32 {p['ours_err']:.4f} "
                f"(bound {p['bound']:.4f}) -> {'OK' if p['ok'] else 'FAIL'}; "
                f"graphs {engine.graphs_text}")  # fmt: skip
            engines.append((label, engine))
    with rep.step("triton: engines against each other"):
        first = engines[0][1].forward(probe)
        diffs = {label: float((e.forward(probe) - first).abs().max()) for label, e in engines[1:]}
        out["triton_vs_first"] = diffs
        log(f"# max |Δ logit| against {engines[0][0]} on a probe: {diffs}")
    triton_rows = out["triton_rows"] = []
    for name in args.workloads.split(","):
        with rep.step(f"triton: workload {name}"):
            wl = workloads[name]
            if args.smoke:  # Triton's interpreter on the CPU: a few short sequences
                wl = dataclasses.replace(wl, lengths=[min(n, 64) for n in wl.lengths[:3]])
            row = {"workload": name, "sequences": len(wl.lengths), "tokens": wl.tokens}
            engine_rates(wl, wl.sequences(), engines, device, row)
            triton_rows.append(row)
            base = next((r for r in rows if r["workload"] == name), {})
            parts = []
            for label, _, compiled in TRITON_VARIANTS:
                if label in row:
                    plain = base.get("ours_compiled" if compiled else "ours_eager", float("nan"))
                    parts.append(f"{label} {row[label] / 1e3:.1f}k ({row[label] / plain:.2f}x plain)")
            log(f"triton {name:<12} " + "  ".join(parts))
    return engines


def graph_steps(rep, engines, workloads, device, smoke: bool) -> None:
    """CUDA graphs: replay parity against the plain forward, one-item latency with graphs off and on, and
    back-to-back small batches with graphs off, with the first bucket kind and with today's."""
    out = rep.data
    graphed = [(label, engine) for label, engine in engines if engine.runner.graphs is not None]

    with rep.step("graph parity"):
        # one item; 16 and 64 traffic items (3k and 11k tokens: buckets of 3,072 and 12,288, max_seqlen 2,048)
        probe_sets = [[[CLS, *([7] * 126), SEP]], workloads["traffic"].sequences()[:16],
                      workloads["traffic"].sequences()[:64],
                      [[CLS, 9, SEP], [CLS, *range(7, 600), SEP], [CLS, 8, 8, SEP]]]  # fmt: skip
        for label, engine in graphed:
            with graphs_off(engine):
                plain = [engine.forward(p) for p in probe_sets]
            diff = max(
                float((engine.forward(p) - q).abs().max()) for p, q in zip(probe_sets, plain, strict=True)
            )
            out.setdefault("graph_vs_plain", {})[label] = diff
            log(f"# {label}: graphed vs ungraphed max |Δ logit| {diff:.4f}")

    with rep.step("latency"):
        lat = out["latency"] = {}
        for label, engine in engines:
            with graphs_off(engine):
                lat[label] = latency(engine, device)
            if engine.runner.graphs is not None:
                lat[label + "_graphs"] = latency(engine, device)
        for label, row in lat.items():
            log(f"latency {label:<21} 1 x 128 tokens: launch {row['launch_ms']:.2f} ms of "
                f"{row['total_ms']:.2f} ms")  # fmt: skip

    rows_small = out["small_batches"] = []
    arrival = workloads["traffic"].sequences()
    for label, engine in engines:
        variants = [("off", graphs_off(engine))]
        if engine.runner.graphs is not None:
            variants += [
                ("on", contextlib.nullcontext(engine)),
                ("first", graph_buckets(engine, FIRST_BUCKETS)),
            ]
        for mode, ctx in variants:  # a step each: a failed recapture of the first buckets costs only its rows
            with rep.step(f"small batches {label} graphs {mode}"), ctx:
                if mode != "off":
                    out.setdefault("graph_sets", {})[f"{label} {mode}"] = engine.graphs_text
                    log(f"# {label}: graphs {mode}: {engine.graphs_text}")
                for row in small_batches(engine, arrival, device, calls=20 if smoke else 100):
                    rows_small.append({"engine": label, "graphs": mode, **row})
                    log(f"small batch {label:<14} graphs {mode:<3} {row['items']:>2} items/call: "
                        f"{row['ms_per_call']:7.2f} ms/call  "
                        f"{row['tokens_per_s'] / 1e3:8.1f}k tok/s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few sequences, CPU allowed")
    ap.add_argument("--workloads", default="short_fixed,short_var,traffic,long_fixed,long_var")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs (default: torch's)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument(
        "--model-dir", default=None, help="write the benchmark checkpoint here (for bench/e2e.py)"
    )
    ap.add_argument(
        "--skip", default="", help=f"comma-separated optional steps to leave out, of {', '.join(OPTIONAL)}"
    )
    ap.add_argument(
        "--triton-variants",
        default=",".join(v[0] for v in TRITON_VARIANTS),
        help="which of our Triton kernels' engines to load and time",
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if unknown := skip - set(OPTIONAL):
        sys.exit(f"--skip: unknown steps {sorted(unknown)}; choose from {', '.join(OPTIONAL)}")

    import transformers
    from transformers import ModernBertForSequenceClassification

    from model import load_classifier

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("bench/gpu.py needs CUDA (use --smoke to check the script on a CPU)")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(f"# bench/gpu.py  card={card}  torch={torch.__version__}  transformers={transformers.__version__}  "
        f"date={time.strftime('%Y-%m-%d')}")  # fmt: skip
    env = {"card": card, "torch": torch.__version__, "transformers": transformers.__version__}
    rep = Report(args.out, {**env, "date": time.strftime("%Y-%m-%d")})
    out = rep.data

    tmp = Path(args.model_dir or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    write_checkpoint(tmp, TINY if args.smoke else SHAPES["base"])
    hf32 = (
        ModernBertForSequenceClassification.from_pretrained(tmp, attn_implementation="sdpa").to(device).eval()
    )
    hf16 = ModernBertForSequenceClassification.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype)
    hf16 = hf16.to(device).eval()
    lengths = [1, 2, 5, 17, 64, 65, 129, 200, 511, 512, 513, 1000, 2000]
    clf, backend, copy_stream = None, None, True
    # if the default kernel or the copy stream fails on this card, still measure: without the copy stream,
    # then with SDPA
    for backend, copy_stream in ((None, True), (None, False), ("sdpa", False)):
        step = f"load + parity ({backend or 'auto'} backend, copy stream {'on' if copy_stream else 'off'})"
        with rep.step(step):
            opts = dict(device=str(device), dtype=dtype, backend=backend, copy_stream=copy_stream)
            clf = load_classifier(tmp, **opts)
            budget = clf.budget_text
            log(f"# ours: backend={clf.backend} dtype={clf.dtype} budget={budget} limits={clf.limits}")
            out.update(backend=clf.backend, budget=budget, max_batch_tokens=clf.limits.max_batch_tokens,
                       copy_stream=copy_stream)  # fmt: skip
            out["parity"] = p = parity(hf32, hf16, clf, device, lengths)
            log(f"# parity vs HF fp32 (max |logit| {p['max_abs_logit']:.3f}): ours bf16 {p['ours_err']:.4f}, "
                f"HF bf16 {p['hf_bf16_err']:.4f}, bound {p['bound']:.4f} -> {'OK' if p['ok'] else 'FAIL'}; "
                f"ours vs HF bf16 {p['ours_vs_hf_bf16']:.4f}")  # fmt: skip
        if step not in out["errors"]:
            break
        clf = None
        if device.type != "cuda":
            break  # the fallbacks only differ on CUDA
    if clf is None:
        sys.exit("bench/gpu.py: our engine failed to load or run with every backend (see errors above)")

    compiled = None
    if not args.no_compile:
        with rep.step("compile"):
            t = time.perf_counter()
            mode = args.compile_mode or True
            candidate = load_classifier(tmp, **opts, compile=mode)
            candidate.warmup()
            out["compile_s"] = time.perf_counter() - t
            log(f"# compile + warm-up: {out['compile_s']:.1f} s")
            probe = [[CLS, *range(7, 7 + 300), SEP], [CLS, 7, 8, SEP]]
            out["compiled_vs_eager"] = float((candidate.forward(probe) - clf.forward(probe)).abs().max())
            log(f"# compiled vs eager max |Δ logit| on a probe: {out['compiled_vs_eager']:.4f}")
            compiled = candidate

    workloads = anchor_workloads()
    if args.smoke:
        workloads = {k: Workload(w.name, [min(n, 1024) for n in w.lengths[:48]], w.hf_batch)
                     for k, w in workloads.items()}  # fmt: skip
    engines = [("ours_eager", clf)] + ([("ours_compiled", compiled)] if compiled else [])
    rows = out["rows"] = []
    for name in args.workloads.split(","):
        with rep.step(f"workload {name}"):
            rows.append(workload_row(workloads[name], hf16, engines, device))

    same_budget = {**opts, "max_batch_tokens": clf.limits.max_batch_tokens}  # rows comparable with ours
    triton_engines = []
    if "triton" not in skip:
        triton_engines = triton_steps(
            rep,
            args,
            tmp,
            clf.runner.net.config,
            same_budget,
            hf32,
            hf16,
            lengths,
            workloads,
            rows,
            device,
            dtype,
        )
    del hf32

    # the attention kernels alone (FA2 and ours): cheap, and what decides our kernel's future
    if device.type == "cuda" and clf.backend == "varlen" and "attention" not in skip:
        with rep.step("attention kernels"):
            out["attention_kernels"] = attention_kernels(clf.config.window)

    if "budget" not in skip:
        with rep.step("budget sweep"):
            top = clf.limits.max_batch_tokens
            # 12,288: every batch under the top graph bucket, so it replays (graphed vs large ungraphed ones)
            budgets = [top // 2, top] if args.smoke else sorted({12288, 32768, 65536, top, 2 * top})
            sweep = [workloads[n] for n in ("traffic", "long_var") if n in args.workloads.split(",")]
            budget_sweep(clf, sweep, budgets, device, out.setdefault("budget_sweep", []))

    if device.type == "cuda" and "nosync" not in skip:
        with rep.step("no sync in launch"):
            # lengths and max_seqlen are host values: queueing a batch must not wait for the device
            # (256 sequences run ungraphed; 4 replay a CUDA graph when graphs are on)
            for size in (256, 4):
                probe = workloads["traffic"].sequences()[:size]
                for label, engine in engines:
                    engine.forward(probe)
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        launched = engine.launch(probe)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                    engine.collect(launched)
                    out.setdefault("no_sync_in_launch", []).append(f"{label} ({size} sequences)")
                    log(f"# {label}: launch of {size} sequences made no host-device sync")

    for label, engine in engines:
        log(f"# {label}: CUDA graphs {engine.graphs_text}")
    out["cuda_graphs"] = {label: engine.graphs_text for label, engine in engines}
    if "graphs" not in skip:
        graph_steps(rep, engines, workloads, device, args.smoke)

    traffic = workloads["traffic"].sequences()[: 64 if args.smoke else 2048]
    profiled = engines + ([] if args.smoke else [e for e in triton_engines if e[0].endswith("_compiled")])
    for label, engine in [] if "profiles" in skip else profiled:  # where the time goes, kernel by kernel
        with rep.step(f"profile {label}"):
            out[f"profile_{label}"] = table = profile(engine, traffic, device)
            log(table)
    del triton_engines

    if "memory" not in skip:
        with rep.step("memory"), graphs_off(clf):  # a replay allocates nothing new: measure the plain forward
            out["memory"] = memory(
                hf16, clf, device, [64, 128, 256] if args.smoke else [512, 1024, 2048, 4096, 8192]
            )

    if device.type == "cuda" and clf.backend == "varlen" and "cudnn" not in skip:
        with rep.step("cudnn attention (probe)"):
            out["attention_kernels_cudnn"] = attention_kernels(clf.config.window, cudnn=True)

    log("\n| workload | HF arrival | HF sorted | ours eager | ours compiled | ours / HF sorted | peak GiB |")
    log("|---|---|---|---|---|---|---|")
    for r in rows:
        best = max(r.get("ours_compiled", 0.0), r.get("ours_eager", 0.0))
        log(f"| {r['workload']} | {r['hf_arrival'] / 1e3:.1f}k | {r['hf_sorted'] / 1e3:.1f}k | "
            f"{r.get('ours_eager', 0) / 1e3:.1f}k | {r.get('ours_compiled', 0) / 1e3:.1f}k | "
            f"{best / r['hf_sorted']:.1f}x | {r.get('ours_eager_gib', 0):.2f} |")  # fmt: skip
    if out["errors"]:
        log(f"# steps that failed: {sorted(out['errors'])}")
    rep.save()


if __name__ == "__main__":
    main()
