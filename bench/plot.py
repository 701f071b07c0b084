"""Plots for docs/benchmarks.md from the JSON the benchmarks wrote (real runs only; nothing is invented).

    python bench/plot.py --cpu bench/out/cpu-small.json bench/out/cpu-base.json \
                         --grpc bench/out/grpc-traffic.json [bench/out/e2e.json] [--gpu bench/out/gpu.json] \
                         --out docs/img

Writes `throughput.png` (tokens/s per engine and workload, ours vs HF, one panel per file),
`latency.png` (p50/p90/p99 latency against achieved throughput from bench/grpc_load.py) and `memory.png`
(peak memory of one input against its length, ours vs HF, from the memory tables of bench/cpu.py and
bench/gpu.py) and, with `--graphs gpu.json`, `graphs.png` (small-batch call time, CUDA graphs off vs on), and
with `--kernels gpu.json`, `kernels.png` (our Triton kernels: the engines with them against the plain ones per
workload, and the fused GEMMs alone against cuBLAS + the compiled elementwise ops).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def throughput(cpu_files: list[Path], gpu_file: Path | None, out: Path) -> None:
    panels = []
    for f in cpu_files:
        d = json.loads(f.read_text())
        tok = d["tokens"]
        rows = {k: tok / v for k, v in d["seconds"].items()}
        panels.append(
            (f"CPU, {d['args']['shape']} shape, {d['args']['workload']} (n={d['args']['n']})", {"": rows})
        )
    if gpu_file is not None:
        d = json.loads(gpu_file.read_text())
        keys = ("hf_arrival", "hf_sorted", "ours_eager", "ours_compiled")
        per = {r["workload"]: {k: r[k] for k in keys if k in r} for r in d["rows"]}
        panels.append((f"GPU ({d['card']}), base shape, bf16", per))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, per) in zip(axes[0], panels, strict=True):
        engines = sorted(
            {e for rows in per.values() for e in rows}, key=lambda e: (not e.startswith("hf"), e)
        )
        width = 0.8 / len(engines)
        for j, engine in enumerate(engines):
            xs = [i + j * width for i in range(len(per))]
            ys = [per[w].get(engine, 0) / 1e3 for w in per]
            ax.bar(xs, ys, width, label=engine)
            for x, y, w in zip(xs, ys, per, strict=True):  # ratio against HF sorted, measured in the same run
                if y and per[w].get("hf_sorted"):
                    ax.annotate(
                        f"{y * 1e3 / per[w]['hf_sorted']:.2f}x", (x, y), ha="center", va="bottom", fontsize=7
                    )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(per))], list(per) if len(per) > 1 else [""])
        ax.set_ylabel("thousand real tokens / s")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)


def latency_rows(path: Path) -> list[dict]:
    """Levels of bench/grpc_load.py (a list) or of bench/e2e.py (its "levels")."""
    data = json.loads(path.read_text())
    return data["levels"] if isinstance(data, dict) else data


def latency(grpc_files: list[Path], out: Path) -> None:
    fig, axes = plt.subplots(1, len(grpc_files), figsize=(6 * len(grpc_files), 4), squeeze=False)
    for ax, path in zip(axes[0], grpc_files, strict=True):
        rows = latency_rows(path)
        x = [r["tokens_per_s"] / 1e3 for r in rows]
        for key in ("p50_ms", "p90_ms", "p99_ms"):
            ax.plot(x, [r[key] for r in rows], marker="o", label=key.removesuffix("_ms"))
        for r, xi in zip(rows, x, strict=True):
            ax.annotate(f"c={r['concurrency']}", (xi, r["p99_ms"]), fontsize=7)
        data = json.loads(path.read_text())
        streams = data.get("stream_levels") if isinstance(data, dict) else None
        if streams:  # bench/e2e.py --stream: the same levels over one ClassifyStream
            xs = [r["tokens_per_s"] / 1e3 for r in streams]
            for key, style in (("p50_ms", "--"), ("p99_ms", ":")):
                label = f"{key.removesuffix('_ms')}, ClassifyStream"
                ax.plot(xs, [r[key] for r in streams], marker="s", linestyle=style, label=label)
        ax.set_xlabel("achieved thousand tokens / s")
        ax.set_ylabel("latency per call, ms (end to end)")
        ax.set_yscale("log")
        ax.set_title(f"gRPC Classify latency vs load ({path.stem})", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)


def memory(cpu_files: list[Path], gpu_file: Path | None, out: Path) -> None:
    panels = []
    for f in cpu_files:
        d = json.loads(f.read_text())
        if d.get("memory"):
            rows = [(m["engine"], r) for m in d["memory"] for r in m["rows"]]
            panels.append(
                (f"CPU, {d['args']['shape']} shape, fp32: peak RSS above baseline", "MiB", rows, 1.0)
            )
    if gpu_file is not None:
        d = json.loads(gpu_file.read_text())
        rows = [(r["engine"], r) for r in d.get("memory", [])]
        panels.append((f"GPU ({d['card']}), base shape, bf16: peak allocated", "MiB", rows, 1024.0))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, unit, rows, scale) in zip(axes[0], panels, strict=True):
        for engine in sorted({e for e, _ in rows}):
            pts = [(r["tokens"], r.get("peak_mib", r.get("peak_gib", 0) * scale)) for e, r in rows
                   if e == engine and r["case"].startswith("1 x ")]  # fmt: skip
            ax.plot([t for t, _ in pts], [m for _, m in pts], marker="o", label=engine)
        ax.set_xlabel("tokens in one input")
        ax.set_ylabel(f"peak {unit}")
        ax.set_title(title, fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)


def graphs(gpu_file: Path, out: Path) -> None:
    """`graphs.png`: milliseconds per `forward` call of 1, 4, 16 (64) traffic items with CUDA graphs off and
    on (and the first bucket kind, where the run measured it), eager and compiled (bench/gpu.py's "small
    batches" step)."""
    d = json.loads(gpu_file.read_text())
    rows = d.get("small_batches", [])
    if not rows:
        return
    sizes = sorted({r["items"] for r in rows})
    variants = sorted({(r["engine"], r["graphs"]) for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(variants)
    for k, (engine, mode) in enumerate(variants):
        per = {r["items"]: r["ms_per_call"] for r in rows if (r["engine"], r["graphs"]) == (engine, mode)}
        ms = [per.get(n, 0.0) for n in sizes]
        xs = [i + k * width for i in range(len(sizes))]
        what = {"first": "first graph buckets"}.get(mode, f"graphs {mode}")
        bars = ax.bar(xs, ms, width, label=f"{engine.removeprefix('ours_')}, {what}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(
        [i + width * (len(variants) - 1) / 2 for i in range(len(sizes))], [f"{n} items" for n in sizes]
    )
    ax.set_ylabel("ms per call (logits on the host)")
    ax.set_title(f"Small batches of traffic items, {d['card']}, base shape, bf16", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "graphs.png", dpi=120)


def kernels(gpu_file: Path, out: Path) -> None:
    """`kernels.png`: tokens/s of the engines with our Triton kernels (fused GEMMs, Triton attention) next to
    the plain engine of the same mode, per workload, each bar labelled with its ratio to that plain engine
    (bench/gpu.py's Triton step); and the fused GEMMs alone, ms per call against cuBLAS + compiled
    elementwise."""
    d = json.loads(gpu_file.read_text())
    plain = {r["workload"]: r for r in d.get("rows", [])}
    rows = d.get("triton_rows", [])
    if not rows:
        return
    ops = d.get("fused_kernels", [])
    fig, axes = plt.subplots(1, 2 if ops else 1, figsize=(13 if ops else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    # the engines gpu.py loaded (its TRITON_VARIANTS that ran), in its order, from their parity records
    labels = [k for k in d.get("triton_parity", {}) if any(k in r for r in rows)]
    series = [("ours_eager", "ours_eager")] + [(k, k) for k in labels if k.endswith("eager")]
    if any("ours_compiled" in r for r in plain.values()):
        series += [("ours_compiled", "ours_compiled")] + [(k, k) for k in labels if k.endswith("compiled")]
    width = 0.8 / len(series)
    workloads = [r["workload"] for r in rows]
    for j, (label, key) in enumerate(series):
        ys = []
        for r in rows:
            src = plain.get(r["workload"], {}) if key.startswith("ours_") else r
            ys.append(src.get(key, 0.0) / 1e3)
        xs = [i + j * width for i in range(len(workloads))]
        bars = ax.bar(xs, ys, width, label=label.replace("ours_", "plain "))
        base = "ours_compiled" if key.endswith("compiled") else "ours_eager"
        ratios = [
            f"{y * 1e3 / plain[w][base]:.2f}x" if y and plain.get(w, {}).get(base) else ""
            for y, w in zip(ys, workloads, strict=True)
        ]
        ax.bar_label(bars, ratios, fontsize=6)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(workloads))], workloads)
    ax.set_ylabel("thousand real tokens / s")
    ax.set_title(f"Our Triton kernels in the network, {d['card']} (ratio to the plain engine)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)
    if ops:
        ax = axes[0][1]
        names = [f"{r['op']}\n{r['tokens']} tokens" for r in ops]
        for j, path in enumerate(("cublas+eager", "cublas+compiled", "fused")):
            xs = [i + j * 0.27 for i in range(len(ops))]
            bars = ax.bar(xs, [r[f"{path}_ms"] for r in ops], 0.27, label=path)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.set_xticks([i + 0.27 for i in range(len(ops))], names, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (log)")
        ax.set_title("The fused GEMMs alone", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kernels.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cpu", nargs="*", type=Path, default=[])
    ap.add_argument("--gpu", type=Path, default=None)
    ap.add_argument("--grpc", type=Path, nargs="+", default=None, help="grpc_load.py or e2e.py JSON files")
    ap.add_argument("--graphs", type=Path, default=None, help="a gpu.py JSON with the small-batch step")
    ap.add_argument("--kernels", type=Path, default=None, help="a gpu.py JSON with our Triton kernels' step")
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cpu or args.gpu:
        throughput(args.cpu, args.gpu, args.out)
        memory(args.cpu, args.gpu, args.out)
    if args.grpc:
        latency(args.grpc, args.out)
    if args.graphs:
        graphs(args.graphs, args.out)
    if args.kernels:
        kernels(args.kernels, args.out)


if __name__ == "__main__":
    main()
