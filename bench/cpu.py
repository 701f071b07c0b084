"""CPU benchmark: our packed classifier vs HF transformers on the same random weights, plus peak memory.

Workload "traffic" of gpu-anchor.md (moderation mix: median 120 tokens, long tail), scaled down to the first
N sequences for a 2-core machine. HF runs in arrival order and length-sorted (batch 32, SDPA, fp32,
inference_mode); we run the engine's planner + packed forward, eager and `torch.compile`d. Prints tokens/s
and the ratios measured in this one run. Then (`--memory`) the peak resident memory of one input of
512 ... 8192 tokens and of one full default token budget, for us and for HF, each engine in a fresh process
so the high-water mark is its own; the MiB-per-1k-tokens column shows whether memory grows linearly.

    python bench/cpu.py --shape small --n 256 --json bench/out/cpu-small.json
    python bench/cpu.py --shape base --n 64 --engines hf_sorted,ours --memory ""
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import CLS, SEP, SHAPES, anchor_workloads, hf_run, memory_cases, padded, write_checkpoint

ENGINES = ("hf_arrival", "hf_sorted", "ours", "ours_compiled")


def load_hf(directory: Path):
    from transformers import ModernBertForSequenceClassification

    return ModernBertForSequenceClassification.from_pretrained(directory, attn_implementation="sdpa").eval()


def time_hf(model, seqs, batch: int, sort: bool) -> float:
    t0 = time.perf_counter()
    hf_run(model, seqs, batch, sort)
    return time.perf_counter() - t0


def time_ours(clf, seqs) -> float:
    t0 = time.perf_counter()
    clf.run_windows(seqs)
    return time.perf_counter() - t0


# ---- memory: one engine per child process ------------------------------------------------------------------
def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB, from /proc (Linux)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def memory_child(engine: str, directory: Path, lengths: list[int]) -> None:
    """Peak RSS above the resident set at the case's start (the loaded, warm model and what earlier cases
    left), for one input per length (ascending) and finally one full default budget of 512-token inputs; the
    high-water mark is reset before each case. JSON on stdout (`baseline_mib`: the RSS after warm-up)."""
    from model import load_classifier

    clf = load_classifier(directory, device="cpu")
    budget = clf.limits.max_batch_tokens
    hf = load_hf(directory) if engine == "hf" else None

    def run(seqs: list[list[int]]) -> None:
        if hf is None:
            clf.run_windows(seqs)
        else:
            with torch.inference_mode():
                ids, mask = padded(seqs, list(range(len(seqs))))
                hf(input_ids=ids, attention_mask=mask)

    run([[CLS, *([7] * 62), SEP]] * 4)  # warm-up
    base = rss_mib()[0]
    rows = []
    for case, seqs in memory_cases(lengths, budget):
        reset_peak()
        # the case's own baseline: what an earlier case left and the allocator has since returned (RSS
        # below `base`) made a small case's peak above `base` negative
        start = rss_mib()[0]
        t0 = time.perf_counter()
        run(seqs)
        rows.append({"case": case, "tokens": sum(map(len, seqs)), "peak_mib": rss_mib()[1] - start,
                     "seconds": time.perf_counter() - t0})  # fmt: skip
    print(json.dumps({"engine": engine, "baseline_mib": base, "rows": rows}))


def memory_table(directory: Path, lengths: list[int]) -> list[dict]:
    out = []
    for engine in ("ours", "hf"):
        cmd = [sys.executable, __file__, "--memory-child", engine, "--dir", str(directory),
               "--memory", ",".join(map(str, lengths))]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"# memory child {engine} failed (rc {res.returncode}): {res.stderr[-500:]}")
            continue
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"\n{'engine':<6} {'case':<28} {'tokens':>7} {'peak MiB':>9} {'MiB/1k tok':>11} {'seconds':>8}")
    for d in out:
        for r in d["rows"]:
            per = r["peak_mib"] / r["tokens"] * 1000
            print(f"{d['engine']:<6} {r['case']:<28} {r['tokens']:>7} {r['peak_mib']:>9.1f} {per:>11.2f} "
                  f"{r['seconds']:>8.2f}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shape", choices=tuple(SHAPES), default="small", help="tiny: a check of the script (tests)"
    )
    ap.add_argument("--n", type=int, default=256, help="first N sequences of the traffic workload")
    ap.add_argument("--workload", default="traffic")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs per engine")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    ap.add_argument("--memory", default="512,1024,2048,4096,8192",
                    help="single-input lengths for the memory table ('' to skip)")  # fmt: skip
    ap.add_argument("--json", default=None, help="also write results to this file")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.memory.split(",") if x]
    if args.memory_child:
        return memory_child(args.memory_child, Path(args.dir), lengths)

    from model import load_classifier

    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        sys.exit(f"--engines: unknown {sorted(unknown)}; choose from {ENGINES}")
    wl = anchor_workloads()[args.workload].head(args.n)
    seqs = wl.sequences()
    tmp = Path(tempfile.mkdtemp())
    write_checkpoint(tmp, SHAPES[args.shape])
    clf = load_classifier(tmp, device="cpu")
    hf = load_hf(tmp)
    compiled, compile_s = None, None
    if "ours_compiled" in engines:
        t0 = time.perf_counter()
        compiled = load_classifier(tmp, device="cpu", compile=True)
        compiled.warmup(max_length=max(wl.lengths))
        compile_s = time.perf_counter() - t0

    # parity spot check on the workload's first sequences (and compiled vs eager on the same)
    idx = list(range(min(8, len(seqs))))
    ids, mask = padded(seqs, idx)
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    first = [seqs[i] for i in idx]
    err = (clf.forward(first) - ref).abs().max().item()
    err_c = (compiled.forward(first) - ref).abs().max().item() if compiled else None

    # best of --repeat runs each (the first run of a shape pays one-time allocator / oneDNN set-up)
    runs = {
        "hf_arrival": lambda: time_hf(hf, seqs, wl.hf_batch, sort=False),
        "hf_sorted": lambda: time_hf(hf, seqs, wl.hf_batch, sort=True),
        "ours": lambda: time_ours(clf, seqs),
        "ours_compiled": lambda: time_ours(compiled, seqs),
    }
    rows = {name: min(runs[name]() for _ in range(args.repeat)) for name in engines}
    tok = wl.tokens
    print(f"# bench/cpu.py  shape={args.shape} workload={args.workload} n={len(seqs)} tokens={tok} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} cores={os.cpu_count()} "
          f"date={time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(
        f"# parity spot check: max |Δlogit| ours {err:.2e}" + (f", compiled {err_c:.2e}" if compiled else "")
    )
    if compile_s is not None:
        print(f"# torch.compile + warm-up up to {max(wl.lengths)} tokens: {compile_s:.1f} s")
    ref_name = "hf_sorted" if "hf_sorted" in rows else next(iter(rows))
    print(f"{'engine':<14} {'seconds':>9} {'tokens/s':>10} {'vs ' + ref_name:>14}")
    for name, sec in rows.items():
        print(f"{name:<14} {sec:9.2f} {tok / sec:10.0f} {rows[ref_name] / sec:13.2f}x")
    memory = memory_table(tmp, lengths) if lengths else []
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "tokens": tok, "seconds": rows, "err": err, "err_compiled": err_c,
             "compile_s": compile_s, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "memory": memory}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
