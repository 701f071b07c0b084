"""End to end vs engine: the same texts through `python -m service` (a real gRPC server in a subprocess, on
loopback) at saturation, and straight through the engine (`Classifier.classify`, one call, in this process).
Prints both throughputs and their ratio — how much the service path (protobuf, scheduler, dynamic batching,
the client on the same machine) costs. Issue target: >= 0.8 on a GPU.

    python bench/e2e.py                                   # bundled model, CPU
    python bench/e2e.py --model DIR --device cuda --items 20000 --concurrency 1,4,16,64,128 \\
        --items-per-call 16 --latency-calls 300

Several concurrency levels (comma-separated) run one after another against the same server; saturation is
the best of them, and the ratio is taken there. `--latency-calls N` then sends N one-item calls of 128 tokens
one at a time: the single-item latency of the service on that device. `--stream` also runs each level over
one ClassifyStream with that many requests unanswered.

Texts are common words sized from the traffic length mix (bench/grpc_load.py), so both paths see the same
token counts; tokens/s counts the content tokens each Result reports.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import free_port
from model.engine_settings import AUTO_ON_OFF


def make_texts(clf, mix: str, n: int, seed: int) -> list[str]:
    from bench.grpc_load import lengths_for, text_of

    rng = random.Random(seed)
    probe = clf.classify([{"text": text_of(400, rng)}])[0].tokens / 400  # tokens per word of this tokenizer
    return [text_of(round((k - 2) / probe), rng) for k in lengths_for(mix, n, seed)]


def engine_run(clf, texts: list[str], repeat: int = 2) -> dict:
    """Best of `repeat` timed calls of `classify` on all texts (the first also pays first-shape set-up), and
    of the model alone on the same windows, tokenized beforehand (`run_windows`): what `classify` costs on
    top of the device is tokenization, windowing and aggregation on the host."""
    items = [{"text": t} for t in texts]
    clf.classify(items[:64])  # warm-up: allocator, kernels

    def best_of(fn) -> tuple[float, float, object]:
        """Best wall time of `repeat` calls, the share of it the device was busy, and fn's result."""
        best, busy, out = float("inf"), 0.0, None
        for _ in range(repeat):
            device, t0 = clf.runner.device_seconds, time.perf_counter()
            out = fn()
            wall = time.perf_counter() - t0
            if wall < best:
                best, busy = wall, (clf.runner.device_seconds - device) / wall
        return best, busy, out

    wall, busy, results = best_of(lambda: clf.classify(items))
    tokens = sum(r.tokens for r in results)
    windows = [w for e in clf.encode(clf.coerce_items(items)) for w in e.windows]
    model, model_busy, _ = best_of(lambda: clf.run_windows(windows))
    return {"wall_s": wall, "items_per_s": len(texts) / wall, "tokens_per_s": tokens / wall,
            "device_busy": busy, "model_only_s": model, "model_only_tokens_per_s": tokens / model,
            "model_only_device_busy": model_busy}  # fmt: skip


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) per thread of a process, by thread id, with the thread's OS name (Linux's
    /proc; {} elsewhere). The server names its Python threads (safety-runner, safety-encode_N, ...); "main"
    is the event loop (gRPC, protobuf, the servicer); threads still named after the executable are native
    pools started before the naming (the tokenizer's Rust pool, torch's intra-op threads, gRPC's own)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()  # fields 3.. of proc(5)'s stat
            tid = int(task.name)
            out[tid] = ("main" if tid == pid else name, (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return out


def thread_usage(before: dict, after: dict, wall_s: float, items: int, top: int = 8) -> list[dict]:
    """The busiest server threads over one level: CPU microseconds per item and the share of the wall time
    each was busy. A thread near 100% busy is what bounds the server (the GIL bounds the Python ones
    together: the sum of their shares cannot pass ~100%)."""
    rows = []
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        if used > 0:
            rows.append({"thread": name, "tid": tid, "us_per_item": used / max(items, 1) * 1e6,
                         "busy": used / wall_s})  # fmt: skip
    return sorted(rows, key=lambda r: -r["busy"])[:top]


def usage_line(rows: list[dict]) -> str:
    return "  ".join(f"{r['thread']} {r['busy']:.0%} ({r['us_per_item']:.0f} us/item)" for r in rows)


async def wait_serving(target: str, proc: subprocess.Popen, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode} before serving")
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"server not SERVING after {timeout:.0f} s")


async def grpc_run(
    args: argparse.Namespace,
    texts: list[str],
    singles: list[str],
    proc: subprocess.Popen,
    target: str,
    metrics: str,
):
    import grpc

    from bench.grpc_load import run_level, run_stream_level
    from service.stubs import pb2, pb2_grpc

    await wait_serving(target, proc, args.start_timeout)
    k = args.items_per_call
    reqs = [
        pb2.ClassifyRequest(items=[pb2.Item(text=t) for t in texts[i : i + k]])
        for i in range(0, len(texts), k)
    ]
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as ch:
        stub = pb2_grpc.SafetyClassifierStub(ch)
        levels = [int(c) for c in str(args.concurrency).split(",")]
        await run_level(stub, reqs[: max(1, 64 // k)], levels[0], (), args.timeout, None)  # warm-up

        async def measured(level):  # a level, and what each server thread spent on it
            before, t0 = thread_cpu(proc.pid), time.perf_counter()
            row = await level
            wall = time.perf_counter() - t0
            return row, thread_usage(before, thread_cpu(proc.pid), wall, row.ok * k)

        rows = [await measured(run_level(stub, reqs, c, (), args.timeout, metrics)) for c in levels]
        streams = [
            await measured(run_stream_level(stub, reqs, c, (), args.timeout, metrics))
            for c in levels
            if args.stream
        ]
        one = [pb2.ClassifyRequest(items=[pb2.Item(text=t)]) for t in singles]
        single = await run_level(stub, one, 1, (), args.timeout, None) if one else None
        return rows, streams, single


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--items-per-call", type=int, default=8)
    ap.add_argument("--concurrency", default="32", help="calls in flight; a comma-separated list runs each")
    ap.add_argument("--mix", default="traffic", help="traffic | fixed:N")
    ap.add_argument("--timeout", type=float, default=300.0, help="deadline per call, seconds")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for SERVING")
    ap.add_argument(
        "--compile", choices=("on", "off"), default="off", help="torch.compile both paths (or neither)"
    )
    ap.add_argument(
        "--attention",
        default="auto",
        help="auto | flash_attn | varlen | sdpa | triton | triton_local (both paths)",
    )
    ap.add_argument(
        "--fused-gemm",
        choices=tuple(AUTO_ON_OFF),
        default="auto",
        help="our fused Triton GEMMs (both paths; auto: on Hopper cards where they run, as the server does)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-calls", type=int, default=0, help="one-item 128-token calls at c=1 afterwards")
    ap.add_argument("--stream", action="store_true", help="also each level over one ClassifyStream")
    ap.add_argument("--simulate", default=None, metavar="RATE[,LAUNCH_MS]",
                    help="both paths on a simulated device of RATE tokens/s (bench/simdevice.py): the host "
                         "side at GPU rates on a CPU-only machine")  # fmt: skip
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from model import load_classifier
    from model.runner import resolve_device
    from model.threads import configure_threads

    # torch's CPU threads as the server sets them (EngineSettings.load): 1 on CUDA, else the CPUs allowed
    configure_threads(accelerator=resolve_device(args.device).type == "cuda")
    backend = args.attention  # "auto": the server's default (model.attention.fastest_backend)
    clf = load_classifier(
        args.model,
        device=args.device,
        backend=backend,
        compile=args.compile == "on",
        fused_gemm=AUTO_ON_OFF[args.fused_gemm],
    )
    if args.simulate:
        from bench.simdevice import simulate

        clf = simulate(clf, args.simulate)
    if args.compile == "on":
        clf.warmup()
    texts = make_texts(clf, args.mix, args.items, args.seed)
    singles = make_texts(clf, "fixed:128", args.latency_calls, args.seed + 1) if args.latency_calls else []
    engine = engine_run(clf, texts)
    device, model_path = clf.device, clf.path
    del clf
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "service", "--model", model_path, "--device", device,
           "--address", f"127.0.0.1:{port}", "--metrics-address", f"127.0.0.1:{mport}",
           "--log-level", "WARNING", "--compile", args.compile, "--attention", args.attention,
           "--fused-gemm", args.fused_gemm]  # fmt: skip
    if args.simulate:
        rate, _, launch_ms = args.simulate.partition(",")
        cmd = [sys.executable, "bench/simdevice.py", "serve", "--rate", rate, "--launch-ms", launch_ms or "0",
               "--model", model_path, "--address", f"127.0.0.1:{port}",
               "--metrics-address", f"127.0.0.1:{mport}"]  # fmt: skip
        device = f"simulated ({args.simulate} tokens/s,launch ms)"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, cwd=root, env=env)
    try:
        rows, streams, single = asyncio.run(
            grpc_run(args, texts, singles, proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics")
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    usage = {r.concurrency: u for r, u in rows}
    stream_usage = {r.concurrency: u for r, u in streams}
    rows, streams = [r for r, _ in rows], [r for r, _ in streams]
    row = max(rows, key=lambda r: r.tokens_per_s)
    ratio = row.tokens_per_s / engine["tokens_per_s"]
    print(f"# bench/e2e.py  model={model_path} device={device} items={len(texts)} mix={args.mix} "
          f"items/call={args.items_per_call} concurrency={args.concurrency} torch={torch.__version__} "
          f"date={time.strftime('%Y-%m-%d')}")  # fmt: skip
    alone = engine["model_only_tokens_per_s"]
    print(f"engine only : {engine['items_per_s']:9.1f} items/s  {engine['tokens_per_s']:10.0f} tokens/s  "
          f"device busy {engine['device_busy']:.0%}  (the model alone on the same windows: {alone:.0f} "
          f"tokens/s, device busy {engine['model_only_device_busy']:.0%}; classify / model = "
          f"{engine['tokens_per_s'] / alone:.2f})")  # fmt: skip
    for r in rows:
        print(f"gRPC c={r.concurrency:<4}: {r.items_per_s:9.1f} items/s  {r.tokens_per_s:10.0f} tokens/s  "
              f"p50 {r.p50_ms:.1f} ms  p99 {r.p99_ms:.1f} ms  batch {r.avg_batch_sequences or 0:.1f}  "
              f"device busy {r.device_busy or 0:.0%}  errors {r.errors or 0}")  # fmt: skip
    print(f"gRPC / engine = {ratio:.2f} (at c={row.concurrency})")
    if usage[row.concurrency]:
        print(f"  server threads at c={row.concurrency}: {usage_line(usage[row.concurrency])}")
    for r in streams:
        print(f"stream w={r.concurrency:<4}: {r.items_per_s:7.1f} items/s  {r.tokens_per_s:10.0f} tokens/s  "
              f"p50 {r.p50_ms:.1f} ms  p99 {r.p99_ms:.1f} ms  batch {r.avg_batch_sequences or 0:.1f}  "
              f"device busy {r.device_busy or 0:.0%}  errors {r.errors or 0}")  # fmt: skip
    if streams:
        best = max(streams, key=lambda r: r.tokens_per_s)
        share = best.tokens_per_s / engine["tokens_per_s"]
        print(f"ClassifyStream / engine = {share:.2f} (at w={best.concurrency})")
        if stream_usage[best.concurrency]:
            print(f"  server threads at w={best.concurrency}: {usage_line(stream_usage[best.concurrency])}")
    if single is not None:
        print(f"one 128-token item per call, c=1: p50 {single.p50_ms:.2f} ms  p90 {single.p90_ms:.2f} ms  "
              f"p99 {single.p99_ms:.2f} ms  ({single.ok} calls)")  # fmt: skip
    if args.json:
        from dataclasses import asdict

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "device": device, "engine": engine,
             "grpc": {**asdict(row), "server_threads": usage[row.concurrency]}, "ratio": ratio,
             "levels": [{**asdict(r), "server_threads": usage[r.concurrency]} for r in rows],
             "stream_levels": [{**asdict(r), "server_threads": stream_usage[r.concurrency]} for r in streams],
             "single_item": asdict(single) if single else None},
            indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
