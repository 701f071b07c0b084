"""One-call GPU benchmark: parity first, then the gpu-anchor.md workloads for HF and for us, same run.

Self-contained for a single `device` call (the GPU image has torch, transformers, tokenizers, safetensors;
no flash-attn, no celery). Steps, in priority order (what a call cut short by its time still has):
  1. environment: card, driver, CUDA, torch, Triton, transformers, and the commit measured (`make gpu-site`
     writes .cache/gpu-site/COMMIT: the GPU machine gets no .git);
  2. a ModernBERT-base-shape random checkpoint (7 labels, multi-label, mean pooling) written with
     `save_pretrained` + our tokenizer file, loaded by HF (bf16, SDPA) and by us (bf16, auto backend);
  3. parity: bf16 logits of both against HF fp32 on mixed lengths (1..2000 tokens, one call, which replays
     a CUDA graph), and again with graphs off on more tokens than the top graph bucket; our error must stay
     within 2x HF-bf16's own error + 0.02 (the bound tests/model/test_compile_gpu.py states); then ours
     compiled: compile, graph capture, budget probe and warm-up timed apart;
  4. each workload: HF arrival order and length-sorted (padded batches of the anchor's size), ours eager and
     ours compiled (each timed --repeat times: the median, and the spread); real tokens/s, peak GiB, ratios;
  then the optional steps (--skip leaves any out; none starts after --deadline-s):
  5. no host-device sync while a batch is packed, copied and queued (sync-debug mode "error");
  6. CUDA graphs (model/graphs.py): replayed vs ungraphed logits, latency of one 128-token item (host launch
     time vs the whole forward) and small-batch calls (1, 4, 16, 64 traffic items) with graphs off, with the
     first bucket kind (`max_seqlen` = tokens, up to 4,096; capture time and pool reported) and with today's
     buckets keyed by tokens, `max_seqlen` and slots (up to 16,384);
  7. profile: the top device kernels of ours eager and compiled on part of the traffic mix;
  8. budget sweep: ours eager on traffic and long_var at token budgets around the probed default, and at
     12,288 tokens, where every batch replays a CUDA graph (the share of graphed batches is printed);
  9. memory: peak device memory above the loaded baseline for one input of 512 ... 8192 tokens and for one
     full default token budget of 512-token inputs, ours and HF; GiB per 1k tokens shows linear growth;
 10. the attention kernel alone: local (window 64) vs global on short, traffic and 8192-token batches, flash
     (FA2) and our Triton kernel (with its largest difference from flash and its tile);
 11. our Triton kernels (late: a kernel fault ends the process's CUDA context): the fused GEMMs
     (model/fused.py, SAFETY_FUSED_GEMM) alone, Wqkv + RoPE and Wi + GeGLU at 4k / 16k / 131k tokens against
     cuBLAS + the eager and the compiled elementwise ops (ms, TFLOP/s, largest difference, the autotuner's
     blocks); then five engines at the same token budget — fused GEMMs and Triton attention
     (model/triton_attention.py, SAFETY_ATTENTION=triton; triton_local: ours on the local layers only), eager
     and compiled: parity against HF fp32 (same bound) replayed and ungraphed, our rows again as a ratio to
     the plain engine's above, and the compiled ones' profiles;
 12. a probe, last: cuDNN's ragged attention on the same packs as step 10, global, against the flash kernel;
 13. a markdown table on stdout (also when steps failed or were skipped) and JSON in $OUT (or --out),
     rewritten after every step.
Every step is guarded: an exception is printed, recorded under "errors" and the next step runs, so one
failing step (a compile error, say) never costs the rest of a GPU call; if our engine fails to load or run
with the default kernel, it is measured again with the SDPA backend. Each step also has a time limit
(--step-cap-s, and the deadline for the optional ones): past it the step is stopped with StepTimeout, after
a traceback of every thread (faulthandler, which also shows where a hang in native code is stuck). A step
that leaves the CUDA context unusable (an illegal memory access is sticky) ends the measuring: the later
steps are skipped, each with a line, instead of failing one by one.
`--smoke` runs everything tiny on the CPU so the script itself is checked without a GPU.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # --deadline-s counts from here, before the heavy imports

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import faulthandler  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.buckets import FIRST_BUCKETS  # noqa: E402
from bench.workloads import (  # noqa: E402
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
from model.graphs import LARGEST  # noqa: E402

TINY = {**SHAPES["tiny"], "local_attention": 16}  # --smoke: short enough sequences still see local layers
PARITY_LENGTHS = [1, 2, 5, 17, 64, 65, 129, 200, 511, 512, 513, 1000, 2000]  # 5,019 tokens: replays a graph
# graphs off, and more tokens than the top graph bucket (model.graphs.LARGEST): 21,019 tokens
UNGRAPHED_LENGTHS = [2000] * 8 + PARITY_LENGTHS
assert sum(UNGRAPHED_LENGTHS) > LARGEST


def log(*a) -> None:
    print(*a, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_cache() -> None:
    """torch.cuda.empty_cache() where an error may have left the CUDA context unusable (it raises again)."""
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


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


@dataclasses.dataclass
class Reference:
    """HF's logits for one set of lengths, computed once for every engine checked on them: fp32 (the
    reference) and bf16 (its own error sets the bound)."""

    seqs: list[list[int]]
    fp32: torch.Tensor
    bf16: torch.Tensor

    @classmethod
    def of(cls, hf32, hf16, device, lengths: list[int]) -> Reference:
        g = torch.Generator().manual_seed(7)
        seqs = [
            [CLS, *torch.randint(5, 50000, (max(n - 2, 0),), generator=g).tolist(), SEP][:n] for n in lengths
        ]
        ids, mask = padded(seqs, list(range(len(seqs))), device)
        with torch.inference_mode():
            ref = hf32(input_ids=ids, attention_mask=mask).logits.float().cpu()
            hf_bf16 = hf16(input_ids=ids, attention_mask=mask).logits.float().cpu()
        return cls(seqs, ref, hf_bf16)


def parity(ref: Reference, clf, graphs: bool = True) -> dict:
    """Our logits against HF fp32 on `ref`'s sequences, as one batch (`graphs` False: launched kernel by
    kernel even where a CUDA graph bucket would take it)."""
    replays = clf.runner.replays
    ours = clf.runner.forward(ref.seqs, graphs=graphs)
    replayed = clf.runner.replays > replays
    scale = ref.fp32.abs().max().item()
    e_hf, e_ours = (ref.bf16 - ref.fp32).abs().max().item(), (ours - ref.fp32).abs().max().item()
    bound = 2 * e_hf + 0.02 * max(1.0, scale)
    return {"tokens": sum(map(len, ref.seqs)), "replayed": replayed, "max_abs_logit": scale,
            "hf_bf16_err": e_hf, "ours_err": e_ours, "bound": bound,
            "ours_vs_hf_bf16": (ours - ref.bf16).abs().max().item(), "ok": e_ours <= bound}  # fmt: skip


def parity_text(p: dict) -> str:
    return (
        f"{p['tokens']} tokens {'replayed' if p['replayed'] else 'ungraphed'}: ours {p['ours_err']:.4f} "
        f"vs HF fp32, HF bf16 {p['hf_bf16_err']:.4f}, bound {p['bound']:.4f} -> {'OK' if p['ok'] else 'FAIL'}"
    )


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
                free_cache()
            tokens = sum(map(len, seqs))
            rows.append({"engine": engine, "case": case, "tokens": tokens, "peak_gib": gib})
            log(f"memory {engine:<5} {case:<28} {tokens:>7} tokens  peak {gib:7.3f} GiB  "
                f"{gib / tokens * 1e3 * 1024:8.2f} MiB/1k tokens")  # fmt: skip
    return rows


class StepTimeout(BaseException):
    """A step ran past its time limit (raised from SIGALRM in the main thread). A BaseException, so the
    steps' own `except Exception` (one engine's failure, one kernel's) cannot swallow it."""


def cuda_health() -> str | None:
    """None while the CUDA context works; else why not (a sticky error such as an illegal memory access
    makes every later CUDA call raise it again). Off CUDA, or before CUDA was used: None."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    try:
        torch.cuda.synchronize()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


class Report:
    """The run's JSON, rewritten after every step; `step` keeps one failing step from ending the run and
    bounds its time; `run` also skips a step past the deadline or after the CUDA context broke."""

    MIN_STEP_S = 10.0  # an optional step with less time than this before the deadline is not started
    HEALTH_S = 30.0  # how long the post-step CUDA check may wait for the device's queued work

    def __init__(
        self,
        out_dir: str,
        data: dict,
        deadline_s: float = math.inf,
        step_cap_s: float = math.inf,
        t0: float = T0,
        health: Callable[[], str | None] = cuda_health,
    ) -> None:
        self.path = Path(out_dir) / "gpu.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = data
        self.data.setdefault("errors", {})
        self.data.setdefault("step_s", {})
        self.data.setdefault("skipped", {})
        self.deadline_s, self.step_cap_s, self.t0, self.health = deadline_s, step_cap_s, t0, health
        self.broken: str | None = None  # why the CUDA context is unusable (the step that broke it)
        self._active: str | None = None

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def skip_reason(self, optional: bool) -> str | None:
        if self.broken:
            return f"the CUDA context is unusable since {self.broken}"
        left = self.deadline_s - self.elapsed()
        if optional and left < self.MIN_STEP_S:
            return (
                f"{self.elapsed():.0f} s into the run, {max(left, 0):.0f} s before its deadline of "
                f"{self.deadline_s:.0f} s"
            )
        return None

    def skip(self, name: str, reason: str) -> None:
        log(f"# -- {name}: skipped ({reason})")
        self.data["skipped"][name] = reason
        self.save()

    def run(self, name: str, fn: Callable[[], object], optional: bool = True, key: str | None = None):
        """`fn()` as the step `name`: its result (also under `key` in the JSON when given), or None when it
        failed or was skipped. Optional steps are skipped from the deadline on and are stopped at it; every
        step is stopped after `step_cap_s`."""
        if reason := self.skip_reason(optional):
            self.skip(name, reason)
            return None
        limit = self.step_cap_s
        if optional:
            limit = min(limit, self.deadline_s - self.elapsed())
        with self.step(name, limit):
            result = fn()
            if key is not None:
                self.data[key] = result
            return result
        return None

    @contextlib.contextmanager
    def step(self, name: str, limit: float = math.inf):
        """Guard one step: an exception (or running past `limit` seconds) is printed and recorded, and the
        run goes on; then the CUDA context is checked (a broken one skips every later step)."""
        if self._active is not None:
            raise RuntimeError(f"step {name!r} inside step {self._active!r}")
        self._active = name
        t0 = time.perf_counter()
        log(f"# -- {name}" + (f" (limit {limit:.0f} s)" if math.isfinite(limit) else ""))
        failed = False
        try:
            with time_limit(f"step {name!r}", limit):
                yield
        except (Exception, StepTimeout) as e:  # recorded and reported; the next step still runs
            failed = True
            traceback.print_exc()
            self.data["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"# !! {name} failed: {type(e).__name__}: {e}")
        finally:
            self._active = None
            self.data["step_s"][name] = round(time.perf_counter() - t0, 2)
            self.check_health(name, failed)
            self.save()

    def check_health(self, name: str, failed: bool) -> None:
        """After each step: is the CUDA context still usable? (A step may have caught a sticky error itself,
        one engine at a time.) If not, every later step is skipped; else a failed step's cached blocks go."""
        try:
            with time_limit("the CUDA check after the step", self.HEALTH_S):
                why = self.health()
        except StepTimeout:
            why = f"the device did not finish its queued work within {self.HEALTH_S:.0f} s"
        if why:
            self.broken = f"step {name!r} ({why})"
            self.data["cuda_broken"] = self.broken
            log(f"# !! the CUDA context is unusable after {name!r}: {why}; the remaining steps are skipped")
        elif failed:
            free_cache()


@contextlib.contextmanager
def time_limit(what: str, seconds: float):
    """Raise StepTimeout in the main thread a second after `seconds` (SIGALRM); at `seconds` faulthandler
    prints every thread's stack to stderr, which also shows a hang inside native code, where no Python
    handler runs (the call's own timeout ends that)."""
    if not math.isfinite(seconds) or not hasattr(signal, "setitimer"):
        yield
        return
    seconds = max(seconds, 1.0)

    def expired(signum, frame):
        raise StepTimeout(f"{what} ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expired)
    faulthandler.dump_traceback_later(seconds, exit=False)
    signal.setitimer(signal.ITIMER_REAL, seconds + 1.0)  # the stacks first, then the exception
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # an alarm due just now is dropped, not raised here
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def workload_row(wl: Workload, hf16, engines, device, repeat: int = 1) -> dict:
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
            free_cache()
    engine_rates(wl, seqs, engines, device, row, repeat)
    best = max(row.get("ours_compiled", 0.0), row.get("ours_eager", 0.0))
    k = {key: row.get(key, 0.0) / 1e3 for key in ("hf_arrival", "hf_sorted", "ours_eager", "ours_compiled")}
    log(f"{wl.name:<12} HF arrival {k['hf_arrival']:8.1f}k  HF sorted {k['hf_sorted']:8.1f}k  "
        f"ours eager {k['ours_eager']:8.1f}k{spread_text(row, 'ours_eager')}  "
        f"ours compiled {k['ours_compiled']:8.1f}k{spread_text(row, 'ours_compiled')}  "
        f"best/HF-sorted {ratio(best, row['hf_sorted']):.2f}x  best/HF-arrival "
        f"{ratio(best, row['hf_arrival']):.2f}x  peak GiB ours {row.get('ours_eager_gib', 0):.2f}  GPU busy "
        f"eager {row.get('ours_eager_device_busy', 0):.0%} compiled "
        f"{row.get('ours_compiled_device_busy', 0):.0%}")  # fmt: skip
    return row


def ratio(a: float | None, b: float | None) -> float:
    """a / b, nan where either is missing or b is 0 (a failed or skipped measurement)."""
    try:
        return a / b if a and b else float("nan")
    except TypeError:
        return float("nan")


def spread_text(row: dict, label: str) -> str:
    """' (±x.x%)': half the range of the repeated runs' rates around their median, when repeated."""
    runs = row.get(label + "_runs")
    if not runs or len(runs) < 2:
        return ""
    return f" (±{(max(runs) - min(runs)) / 2 / statistics.median(runs):.1%})"


def engine_rates(wl: Workload, seqs: list[list[int]], engines, device, row: dict, repeat: int = 1) -> None:
    """Our engines on one workload: tokens/s (the median of `repeat` timed runs; all of them under
    `<label>_runs` when more than one), peak GiB and the GPU's busy share, into `row` (label keys)."""
    for label, engine in engines:
        try:  # one engine failing on this workload (a compile error, say) keeps HF's and the other's numbers
            engine.run_windows(seqs[: min(len(seqs), 64)])  # warm-up
            reset_peak(device)
            rates, busy = [], []
            for _ in range(repeat):
                before = engine.runner.device_seconds
                sec = timed(lambda e=engine, s=seqs: e.run_windows(s), device)
                rates.append(wl.tokens / sec)
                busy.append((engine.runner.device_seconds - before) / sec)  # the GPU's share of the time
        except Exception as e:
            row[label + "_error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"# {wl.name}: {label} failed: {row[label + '_error'][:300]}")
            free_cache()
            continue
        row[label] = statistics.median(rates)
        if repeat > 1:
            row[label + "_runs"] = rates
        row[label + "_gib"] = peak_gib(device)
        row[label + "_device_busy"] = statistics.median(busy)


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
        free_cache()


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
OPTIONAL = (
    "triton",
    "fused_kernels",
    "attention",
    "budget",
    "nosync",
    "graphs",
    "profiles",
    "memory",
    "cudnn",
)


# Our Triton kernels as engine variants: (label, load_classifier options, compiled), most wanted first (the
# first: what the server and workers run on Hopper cards since session 20). Each row is compared with the
# plain engine of the same compile mode measured above in this run.
TRITON_VARIANTS = (
    ("fused_local_compiled", {"fused_gemm": True, "backend": "triton_local"}, True),  # the Hopper default
    ("fused_compiled", {"fused_gemm": True}, True),
    ("triton_local_compiled", {"backend": "triton_local"}, True),  # ours on local layers, FA2 on global
    ("fused_triton_compiled", {"fused_gemm": True, "backend": "triton"}, True),
    ("triton_attn_compiled", {"backend": "triton"}, True),
    ("fused_eager", {"fused_gemm": True}, False),
    ("triton_attn_eager", {"backend": "triton"}, False),
)


def load_timed(ckpt, opts: dict, compile, warmup_length: int | None) -> tuple[object, dict]:
    """load_classifier + warm-up, and where the time went: `compile_s` the first compile alone (CUDA: on a
    large batch at load; on the CPU compiling happens lazily, inside the warm-up), `graph_capture_s`,
    `budget_probe_s`, `warmup_s`, `load_s` (all of it)."""
    from model import load_classifier

    t = time.perf_counter()
    engine = load_classifier(ckpt, **opts, compile=compile)
    warmup_s = engine.warmup(max_length=warmup_length)
    stages = {"load_s": time.perf_counter() - t, **engine.runner.timings, "warmup_s": warmup_s}
    return engine, stages


def stages_text(stages: dict) -> str:
    names = ("compile_s", "graph_capture_s", "budget_probe_s", "warmup_s", "load_s")
    return ", ".join(f"{n[:-2].replace('_', ' ')} {stages[n]:.1f} s" for n in names if n in stages)


def triton_steps(rep, args, ckpt, config, opts, refs, workloads, rows, device, dtype) -> None:
    """Our Triton kernels, where Triton can run: model/fused.py's GEMMs (SAFETY_FUSED_GEMM) alone, then the
    network with them and with model/triton_attention.py's attention (SAFETY_ATTENTION=triton, and
    triton_local: ours on the local layers only), eager and compiled: parity against HF fp32 (the same
    bound) on a graph-replayed batch and on an ungraphed one above the top bucket, our rows again, each
    against the plain engine's row measured above in this run, and the compiled engines' profiles."""
    from model import fused

    out = rep.data
    c = config
    why = fused.unsupported(
        device, dtype, c.hidden_activation, c.hidden_size, c.num_attention_heads, c.intermediate_size
    )
    if why is not None:
        out["triton"] = f"skipped: {why}"
        log(f"# Triton kernels: skipped ({why})")
        return

    def kernels() -> None:
        tokens = [40] if args.smoke else [4096, 16384, 131072]
        out["fused_kernels"] = fused_kernel_rows(config, tokens, device, dtype)

    if "fused_kernels" not in args.skip_set:
        rep.run("fused GEMMs: kernels", kernels)
    probe = [[CLS, *range(7, 7 + (20 if args.smoke else 300)), SEP], [CLS, 7, 8, SEP]]
    first: list = []  # (label, logits on the probe) of the first engine loaded
    rows_by_name = {name: {"workload": name} for name in args.workloads.split(",")}
    out["triton_rows"] = list(rows_by_name.values())

    def load(label: str, extra: dict, compiled: bool):
        try:
            engine, stages = load_timed(
                ckpt,
                {**opts, **extra},
                (args.compile_mode or True) if compiled else False,
                16 if args.smoke else None,
            )
        except ValueError as e:  # e.g. triton_local without a CUDA flash kernel for its global layers
            out.setdefault("triton_skipped", {})[label] = str(e)
            log(f"# {label}: skipped ({e})")
            return None
        out.setdefault("triton_load", {})[label] = stages
        log(f"# {label}: {stages_text(stages)}; graphs {engine.graphs_text}")
        out.setdefault("triton_parity", {})[label] = p = parity(refs["triton"], engine)
        log(f"# {label}: parity {parity_text(p)}")
        out.setdefault("triton_parity_ungraphed", {})[label] = q = parity(
            refs["triton_ungraphed"], engine, False
        )
        log(f"# {label}: parity {parity_text(q)}")
        logits = engine.forward(probe)
        if not first:
            first.append((label, logits))
        else:
            diff = out.setdefault("triton_vs_first", {})[label] = float((logits - first[0][1]).abs().max())
            log(f"# {label}: max |Δ logit| against {first[0][0]} on a probe {diff:.4f}")
        return engine

    def workloads_of(label: str, engine, compiled: bool) -> None:
        for name, row in rows_by_name.items():
            wl = workloads[name]
            if args.smoke:  # Triton's interpreter on the CPU: two short sequences
                wl = dataclasses.replace(wl, lengths=[min(n, 32) for n in wl.lengths[:2]])
            row.update(sequences=len(wl.lengths), tokens=wl.tokens)
            engine_rates(wl, wl.sequences(), [(label, engine)], device, row, args.repeat)
            base = next((r for r in rows if r["workload"] == name), {})
            plain = base.get("ours_compiled" if compiled else "ours_eager")
            if label in row:
                log(f"triton {name:<12} {label} {row[label] / 1e3:.1f}k{spread_text(row, label)} "
                    f"({ratio(row[label], plain):.2f}x plain)")  # fmt: skip

    # one engine at a time, all of its steps (load, parity, rows, profile), then let go of it: a call that
    # runs out of time has whole engines, and the device holds one Triton engine at most
    for label, extra, compiled in TRITON_VARIANTS:
        if (compiled and args.no_compile) or label not in args.triton_variants.split(","):
            continue
        engine = rep.run(f"triton: {label} engine + parity", lambda a=(label, extra, compiled): load(*a))
        if engine is None:
            continue
        rep.run(f"triton: {label} workloads", lambda a=(label, engine, compiled): workloads_of(*a))
        if compiled and "profiles" not in args.skip_set and not args.smoke:
            traffic = workloads["traffic"].sequences()[:2048]
            rep.run(f"profile {label}", lambda a=(out, label, engine, traffic, device): profile_step(*a))
        del engine
        gc.collect()  # the runner and its graphs refer to each other
        free_cache()
    best_engine(out, rows_by_name.get("traffic"), rows)


def best_engine(out: dict, triton_row: dict | None, rows: list[dict]) -> None:
    """`best_traffic`: the fastest compiled engine on the traffic mix in this run, as the options that load
    it (gpu_all.sh's E2E_ENGINE=best runs bench/e2e.py with them)."""
    plain = next((r for r in rows if r["workload"] == "traffic"), {})
    options = {"ours_compiled": {"backend": out.get("backend", "auto"), "fused_gemm": False}}
    options.update({label: {"backend": out.get("backend", "auto"), "fused_gemm": False, **extra}
                    for label, extra, compiled in TRITON_VARIANTS if compiled})  # fmt: skip
    rates = {label: r[label] for r in (plain, triton_row or {}) for label in options if r.get(label)}
    if rates:
        label = max(rates, key=rates.get)
        out["best_traffic"] = {"engine": label, "tokens_per_s": rates[label], **options[label]}
        log(f"# fastest compiled engine on traffic: {label} {rates[label] / 1e3:.1f}k ({options[label]})")


def profile_step(out: dict, label: str, engine, seqs, device) -> None:
    out[f"profile_{label}"] = table = profile(engine, seqs, device)
    log(table)


def graph_steps(rep, engines, workloads, device, smoke: bool) -> None:
    """CUDA graphs: replay parity against the plain forward, one-item latency with graphs off and on, and
    back-to-back small batches with graphs off, with the first bucket kind and with today's."""
    out = rep.data
    graphed = [(label, engine) for label, engine in engines if engine.runner.graphs is not None]

    def graph_parity() -> None:
        # one item; 16 and 64 traffic items (3k and 11k tokens: buckets of 3,072 and 12,288, max_seqlen 2,048)
        probe_sets = [[[CLS, *([7] * 126), SEP]], workloads["traffic"].sequences()[:16],
                      workloads["traffic"].sequences()[:64],
                      [[CLS, 9, SEP], [CLS, *range(7, 600), SEP], [CLS, 8, 8, SEP]]]  # fmt: skip
        for label, engine in graphed:
            plain = [engine.runner.forward(p, graphs=False) for p in probe_sets]
            diff = max(
                float((engine.forward(p) - q).abs().max()) for p, q in zip(probe_sets, plain, strict=True)
            )
            out.setdefault("graph_vs_plain", {})[label] = diff
            log(f"# {label}: graphed vs ungraphed max |Δ logit| {diff:.4f}")

    def latencies() -> None:
        lat = out["latency"] = {}
        for label, engine in engines:
            with graphs_off(engine):
                lat[label] = latency(engine, device)
            if engine.runner.graphs is not None:
                lat[label + "_graphs"] = latency(engine, device)
        for label, row in lat.items():
            log(f"latency {label:<21} 1 x 128 tokens: launch {row['launch_ms']:.2f} ms of "
                f"{row['total_ms']:.2f} ms")  # fmt: skip

    rep.run("graph parity", graph_parity)
    rep.run("latency", latencies)
    rows_small = out["small_batches"] = []
    arrival = workloads["traffic"].sequences()

    def small(label: str, engine, mode: str) -> None:
        if mode == "first":  # recaptured for the run, the engine's own graphs restored after
            ctx = graph_buckets(engine, FIRST_BUCKETS)
        else:
            ctx = graphs_off(engine) if mode == "off" else contextlib.nullcontext(engine)
        with ctx:
            if mode != "off":
                out.setdefault("graph_sets", {})[f"{label} {mode}"] = engine.graphs_text
                log(f"# {label}: graphs {mode}: {engine.graphs_text}")
            sizes = (1, 4) if smoke else (1, 4, 16, 64)
            for row in small_batches(engine, arrival, device, sizes, calls=5 if smoke else 100):
                rows_small.append({"engine": label, "graphs": mode, **row})
                log(f"small batch {label:<14} graphs {mode:<3} {row['items']:>2} items/call: "
                    f"{row['ms_per_call']:7.2f} ms/call  "
                    f"{row['tokens_per_s'] / 1e3:8.1f}k tok/s")  # fmt: skip

    for label, engine in engines:
        modes = ["off"] + (["on", "first"] if engine.runner.graphs is not None else [])
        for mode in modes:  # a step each: a failed recapture of the first buckets costs only its rows
            rep.run(f"small batches {label} graphs {mode}", lambda a=(label, engine, mode): small(*a))


def environment(device: torch.device) -> dict:
    """What the numbers were measured on and with: card, driver, CUDA, torch, Triton, transformers, Python,
    and the commit (with a dirty flag)."""
    import transformers

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cuda = device.type == "cuda"
    return {
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "driver": driver_version() if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
    }


def driver_version() -> str:
    """The NVIDIA driver's version (nvidia-smi), or why it is unknown."""
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)  # fmt: skip
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({type(e).__name__})"


def commit() -> dict:
    """The code measured: git where there is a checkout, else .cache/gpu-site/COMMIT (`make gpu-site` writes
    it: the GPU machine gets no .git), else unknown. `diff`: for a dirty tree, the first 12 hex digits of the
    sha256 of `git diff HEAD` and `git status --porcelain` (the Makefile computes the same)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=15,
                              check=True).stdout  # fmt: skip

    try:
        head, status = git("rev-parse", "HEAD").strip(), git("status", "--porcelain")
        words, source = [head, "dirty" if status.strip() else "clean"], "git"
        if status.strip():
            words.append(hashlib.sha256((git("diff", "HEAD") + status).encode()).hexdigest()[:12])
    except (OSError, subprocess.SubprocessError):
        try:
            words, source = (ROOT / ".cache" / "gpu-site" / "COMMIT").read_text().split(), "make gpu-site"
        except OSError:
            return {"hash": "unknown", "dirty": None, "diff": None, "source": "none (no git, no COMMIT file)"}
    return {"hash": words[0] if words else "unknown", "dirty": len(words) > 1 and words[1] == "dirty",
            "diff": words[2] if len(words) > 2 else None, "source": source}  # fmt: skip


def commit_text(c: dict) -> str:
    if c["dirty"] is None:
        return c["hash"]
    if not c["dirty"]:
        return c["hash"][:12]
    return f"{c['hash'][:12]} (dirty{', diff ' + c['diff'] if c.get('diff') else ''})"


def fmt_k(value) -> str:
    return f"{value / 1e3:.1f}k" if isinstance(value, float | int) and math.isfinite(value) and value else "-"


def fmt_x(value: float) -> str:
    return f"{value:.1f}x" if math.isfinite(value) else "-"


def final_table(out: dict) -> None:
    """The markdown tables, from whatever the run has (missing cells: '-'), and the steps that failed or were
    skipped."""
    log("\n| workload | HF arrival | HF sorted | ours eager | ours compiled | best / HF sorted "
        "| best / HF arrival | peak GiB |")  # fmt: skip
    log("|---|---|---|---|---|---|---|---|")
    for r in out.get("rows", []):
        best = max(r.get("ours_compiled", 0.0), r.get("ours_eager", 0.0))
        log(f"| {r['workload']} | {fmt_k(r.get('hf_arrival'))} | {fmt_k(r.get('hf_sorted'))} | "
            f"{fmt_k(r.get('ours_eager'))}{spread_text(r, 'ours_eager')} | "
            f"{fmt_k(r.get('ours_compiled'))}{spread_text(r, 'ours_compiled')} | "
            f"{fmt_x(ratio(best, r.get('hf_sorted')))} | {fmt_x(ratio(best, r.get('hf_arrival')))} | "
            f"{r.get('ours_eager_gib', float('nan')):.2f} |")  # fmt: skip
    if out.get("triton_rows"):
        plain = {r["workload"]: r for r in out.get("rows", [])}
        log("\n| workload | engine | tokens/s | vs plain (same compile mode) |")
        log("|---|---|---|---|")
        for r in out["triton_rows"]:
            for label, _, compiled in TRITON_VARIANTS:
                if label in r:
                    base = plain.get(r["workload"], {}).get("ours_compiled" if compiled else "ours_eager")
                    log(f"| {r['workload']} | {label} | {fmt_k(r[label])}{spread_text(r, label)} | "
                        f"{ratio(r[label], base):.2f}x |")  # fmt: skip
    if out.get("skipped"):
        log(f"# steps skipped: {sorted(out['skipped'])}")
    if out.get("errors"):
        log(f"# steps that failed: {sorted(out['errors'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed runs of each of our engines per workload (the median is reported, and the "
                         "spread when more than one; HF runs once)")  # fmt: skip
    ap.add_argument("--deadline-s", type=float, default=400.0,
                    help="seconds after the process started from which no optional step starts (and "
                         "a running one is stopped); the parity, compile and workload steps always "
                         "run")  # fmt: skip
    ap.add_argument("--step-cap-s", type=float, default=150.0,
                    help="the most seconds any one step may take before it is stopped")  # fmt: skip
    args = ap.parse_args()
    args.skip_set = skip = set(filter(None, args.skip.split(",")))
    if unknown := skip - set(OPTIONAL):
        sys.exit(f"--skip: unknown steps {sorted(unknown)}; choose from {', '.join(OPTIONAL)}")
    if args.repeat < 1:
        sys.exit("--repeat: at least 1")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("bench/gpu.py needs CUDA (use --smoke to check the script on a CPU)")
    env = environment(device)
    log(f"# bench/gpu.py  card={env['card']}  driver={env['driver']}  cuda={env['cuda']}  "
        f"torch={env['torch']}  triton={env['triton']}  transformers={env['transformers']}  "
        f"commit={commit_text(env['commit'])}  date={env['date']}")  # fmt: skip
    rep = Report(args.out, env, deadline_s=args.deadline_s, step_cap_s=args.step_cap_s)
    log(f"# time limits: no optional step starts after {args.deadline_s:.0f} s (now {rep.elapsed():.0f} s); "
        f"a step stops after {args.step_cap_s:.0f} s; --repeat {args.repeat}")  # fmt: skip
    try:
        measure(args, rep, device)
    finally:
        final_table(rep.data)
        rep.data["total_s"] = round(rep.elapsed(), 1)
        log(f"# bench/gpu.py: {rep.data['total_s']:.0f} s")
        rep.save()


def measure(args, rep: Report, device: torch.device) -> None:
    from transformers import ModernBertForSequenceClassification

    out, skip = rep.data, args.skip_set
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = Path(args.model_dir or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    write_checkpoint(tmp, TINY if args.smoke else SHAPES["base"])
    hf32 = (
        ModernBertForSequenceClassification.from_pretrained(tmp, attn_implementation="sdpa").to(device).eval()
    )
    hf16 = ModernBertForSequenceClassification.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype)
    hf16 = hf16.to(device).eval()
    # the lengths each parity check runs on; HF's logits for them computed once, on first use
    # smoke: a few hundred tokens (the CPU has no graphs to step around), ~150 in Triton's interpreter
    sets = {"plain": PARITY_LENGTHS, "ungraphed": [600, 300, 65, 17, 5] if args.smoke else UNGRAPHED_LENGTHS,
            "triton": [1, 2, 5, 17, 64, 65] if args.smoke else PARITY_LENGTHS,
            "triton_ungraphed": [100, 17, 5] if args.smoke else UNGRAPHED_LENGTHS}  # fmt: skip
    refs = LazyReferences(hf32, hf16, device, sets)

    def load_plain(opts: dict):
        clf, stages = load_timed(tmp, opts, False, 64 if args.smoke else None)  # warmed up like the others
        log(f"# ours: backend={clf.backend} dtype={clf.dtype} budget={clf.budget_text} limits={clf.limits}")
        log(f"# ours: {stages_text(stages)}; graphs {clf.graphs_text}")
        out.update(backend=clf.backend, budget=clf.budget_text, max_batch_tokens=clf.limits.max_batch_tokens,
                   copy_stream=opts["copy_stream"], load=stages,
                   cuda_graphs={"ours_eager": clf.graphs_text})  # fmt: skip
        out["parity"] = p = parity(refs["plain"], clf)
        log(f"# parity vs HF fp32 (max |logit| {p['max_abs_logit']:.3f}): {parity_text(p)}; "
            f"ours vs HF bf16 {p['ours_vs_hf_bf16']:.4f}")  # fmt: skip
        out["parity_ungraphed"] = q = parity(refs["ungraphed"], clf, graphs=False)
        log(f"# parity vs HF fp32: {parity_text(q)}")
        return clf

    clf, opts = None, {}
    # if the default kernel or the copy stream fails on this card, still measure: without the copy stream,
    # then with SDPA
    for backend, copy_stream in ((None, True), (None, False), ("sdpa", False)):
        opts = dict(device=str(device), dtype=dtype, backend=backend, copy_stream=copy_stream)
        step = f"load + parity ({backend or 'auto'} backend, copy stream {'on' if copy_stream else 'off'})"
        clf = rep.run(step, lambda o=opts: load_plain(o), optional=False)
        if clf is not None or device.type != "cuda" or rep.broken:
            break  # the fallbacks only differ on CUDA
    if clf is None:
        sys.exit("bench/gpu.py: our engine failed to load or run with every backend (see errors above)")

    def compile_step():
        engine, stages = load_timed(tmp, opts, args.compile_mode or True, 64 if args.smoke else None)
        out["compile"] = stages
        out["compile_s"] = stages.get("compile_s")  # the first compile alone (on the CPU: inside the warm-up)
        log(f"# compiled: {stages_text(stages)}; graphs {engine.graphs_text}")
        probe = [[CLS, *range(7, 7 + 300), SEP], [CLS, 7, 8, SEP]]
        out["compiled_vs_eager"] = float((engine.forward(probe) - clf.forward(probe)).abs().max())
        log(f"# compiled vs eager max |Δ logit| on a probe: {out['compiled_vs_eager']:.4f}")
        out["parity_compiled"] = p = parity(refs["plain"], engine)
        out["parity_compiled_ungraphed"] = q = parity(refs["ungraphed"], engine, graphs=False)
        log(f"# compiled parity vs HF fp32: {parity_text(p)}; {parity_text(q)}")
        out["cuda_graphs"]["ours_compiled"] = engine.graphs_text
        return engine

    compiled = None if args.no_compile else rep.run("compile", compile_step, optional=False)

    workloads = anchor_workloads()
    if args.smoke:
        workloads = {k: Workload(w.name, [min(n, 1024) for n in w.lengths[:48]], w.hf_batch)
                     for k, w in workloads.items()}  # fmt: skip
    engines = [("ours_eager", clf)] + ([("ours_compiled", compiled)] if compiled else [])
    rows = out["rows"] = []
    for name in args.workloads.split(","):
        row = rep.run(
            f"workload {name}",
            lambda n=name: workload_row(workloads[n], hf16, engines, device, args.repeat),
            optional=False,
        )
        if row is not None:
            rows.append(row)

    # ---- optional steps, most wanted first; our Triton kernels last (a kernel fault ends the CUDA context)
    if device.type == "cuda" and "nosync" not in skip:
        rep.run("no sync in launch", lambda: no_sync_in_launch(out, engines, workloads))
    if "graphs" not in skip:
        graph_steps(rep, engines, workloads, device, args.smoke)
    if "profiles" not in skip:
        traffic = workloads["traffic"].sequences()[: 16 if args.smoke else 2048]
        for label, engine in engines:  # where the time goes, kernel by kernel
            rep.run(f"profile {label}", lambda a=(out, label, engine, traffic, device): profile_step(*a))

    if "budget" not in skip:

        def sweep() -> None:
            top = clf.limits.max_batch_tokens
            # 12,288: every batch under the top graph bucket, so it replays (graphed vs large ungraphed ones)
            budgets = [top // 2, top] if args.smoke else sorted({12288, 32768, 65536, top, 2 * top})
            chosen = [workloads[n] for n in ("traffic", "long_var") if n in args.workloads.split(",")]
            budget_sweep(clf, chosen, budgets, device, out.setdefault("budget_sweep", []))

        rep.run("budget sweep", sweep)

    if "memory" not in skip:

        def memory_step() -> None:
            with graphs_off(clf):  # a replay allocates nothing new: measure the plain forward
                lengths = [64, 128, 256] if args.smoke else [512, 1024, 2048, 4096, 8192]
                out["memory"] = memory(hf16, clf, device, lengths)

        rep.run("memory", memory_step)

    # the attention kernels alone (FA2 and ours): cheap, and what decides our kernel's future
    if device.type == "cuda" and clf.backend == "varlen" and "attention" not in skip:
        rep.run("attention kernels", lambda: attention_kernels(clf.config.window), key="attention_kernels")

    if "triton" not in skip:
        same_budget = {**opts, "max_batch_tokens": clf.limits.max_batch_tokens}  # rows comparable with ours
        if args.smoke:  # Triton's interpreter: warm-up batches of ~128 tokens
            same_budget.update(max_tokens=128, max_batch_tokens=256)
        triton_steps(rep, args, tmp, clf.runner.net.config, same_budget, refs, workloads, rows, device, dtype)

    if device.type == "cuda" and clf.backend == "varlen" and "cudnn" not in skip:
        probe = lambda: attention_kernels(clf.config.window, cudnn=True)  # noqa: E731
        rep.run("cudnn attention (probe)", probe, key="attention_kernels_cudnn")


class LazyReferences(dict):
    """name -> Reference for the lengths `sets[name]`, HF's logits computed on first use (inside the step
    that needs them, so a failure there is that step's)."""

    def __init__(self, hf32, hf16, device, sets: dict[str, list[int]]) -> None:
        super().__init__()
        self.hf32, self.hf16, self.device, self.sets = hf32, hf16, device, sets

    def __missing__(self, name: str) -> Reference:
        self[name] = ref = Reference.of(self.hf32, self.hf16, self.device, self.sets[name])
        return ref


def no_sync_in_launch(out: dict, engines, workloads) -> None:
    """Lengths and max_seqlen are host values: queueing a batch must not wait for the device (256 sequences
    run ungraphed; 4 replay a CUDA graph when graphs are on)."""
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


if __name__ == "__main__":
    main()
