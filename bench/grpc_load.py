"""Load test for a running `safety serve` (loopback only): a fixed number of Classify calls at each given
concurrency, items drawn from the traffic length mix; prints throughput and p50/p90/p99 latency.

    python bench/grpc_load.py --target 127.0.0.1:50051 --calls 1000 --concurrency 1,4,16,64
    python bench/grpc_load.py --mix fixed:128 --concurrency 1 --calls 500   # single-item latency target

Lengths: `traffic` is gpu-anchor.md's moderation mix (log-normal, median 120 tokens, clamped to [8, 8192]),
the distribution of bench/workloads.py's `traffic` (drawn here without torch); `fixed:N` is N tokens per
item. Texts are made of common words, sized with a tokens-per-word ratio measured on the server first (one
probe call), so the server's own tokenizer decides the real lengths; the table reports the tokens the
server counted. With `--metrics URL` the average batch size the scheduler formed, and the share of the time
its device was busy (`safety_device_seconds_total`), are read from Prometheus.
`--stream` sends each level's calls over one ClassifyStream instead, with "concurrency" requests unanswered.
Latency is end to end from a Python grpc.aio client on the same machine: on a small CPU box the client
itself costs a share of the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.stubs import pb2, pb2_grpc

LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")
WORDS = (  # noqa: SIM905 (one readable block of common English words)
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very"
).split()


def traffic_lengths(n: int, seed: int = 0) -> list[int]:
    """gpu-anchor.md's traffic mix: exp(log 120 + N(0, 1)) tokens, rounded, clamped to [8, 8192]."""
    rng = random.Random(seed)
    return [int(min(8192, max(8, round(math.exp(math.log(120) + rng.gauss(0.0, 1.0)))))) for _ in range(n)]


def lengths_for(mix: str, n: int, seed: int) -> list[int]:
    if mix == "traffic":
        return traffic_lengths(n, seed)
    if mix.startswith("fixed:"):
        return [int(mix.split(":", 1)[1])] * n
    raise SystemExit(f"--mix: expected traffic or fixed:N, got {mix!r}")


def text_of(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


@dataclass
class Row:
    concurrency: int
    calls: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    calls_per_s: float
    items_per_s: float
    tokens_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    avg_batch_sequences: float | None
    device_busy: float | None = None  # share of the wall time the server's device spent on batches


def percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))]


SCRAPED = ("safety_batch_size_sum", "safety_batch_size_count", "safety_device_seconds_total")


def scrape(url: str | None) -> dict[str, float] | None:
    """The server's batch counters (`SCRAPED`) from its Prometheus endpoint; None without a URL."""
    if not url:
        return None
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    values = dict.fromkeys(SCRAPED, 0.0)
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key in values:
            values[key] = float(value)
    return values


async def tokens_per_word(stub: pb2_grpc.SafetyClassifierStub, metadata: tuple, rng: random.Random) -> float:
    probe = text_of(400, rng)
    response = await stub.Classify(
        pb2.ClassifyRequest(items=[pb2.Item(text=probe)]), metadata=metadata, timeout=60
    )
    return max(0.05, response.results[0].tokens / 400)


@dataclass
class Tally:
    """What one level's calls returned, filled in while they run."""

    latencies: list[float] = field(default_factory=list)  # ms, answered calls only
    errors: dict[str, int] = field(default_factory=dict)  # status name -> calls
    items: int = 0
    tokens: int = 0

    def answered(self, ms: float, response: pb2.ClassifyResponse) -> None:
        self.latencies.append(ms)
        self.items += len(response.results)
        self.tokens += sum(r.tokens for r in response.results)

    def failed(self, status: str) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1


async def measured(
    concurrency: int, calls: int, metrics_url: str | None, load: Callable[[Tally], Awaitable[None]]
) -> Row:
    """Run `load` (all of one level's calls) and summarise it: throughput, latency percentiles, and the
    average batch the server formed meanwhile (from its metrics, when a URL is given)."""
    tally = Tally()
    before = scrape(metrics_url)
    start = time.perf_counter()
    await load(tally)
    wall = time.perf_counter() - start
    after = scrape(metrics_url)
    avg_batch = device_busy = None
    if before and after:
        delta = {k: after[k] - before[k] for k in SCRAPED}
        if delta["safety_batch_size_count"] > 0:
            avg_batch = delta["safety_batch_size_sum"] / delta["safety_batch_size_count"]
        device_busy = delta["safety_device_seconds_total"] / wall
    latencies = sorted(tally.latencies)
    return Row(
        concurrency=concurrency,
        calls=calls,
        ok=len(latencies),
        errors=tally.errors,
        wall_s=wall,
        calls_per_s=len(latencies) / wall,
        items_per_s=tally.items / wall,
        tokens_per_s=tally.tokens / wall,
        p50_ms=percentile(latencies, 0.50),
        p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99),
        avg_batch_sequences=avg_batch,
        device_busy=device_busy,
    )


async def run_level(
    stub: pb2_grpc.SafetyClassifierStub,
    requests: list[pb2.ClassifyRequest],
    concurrency: int,
    metadata: tuple,
    timeout: float,
    metrics_url: str | None,
) -> Row:
    """`requests` as unary Classify calls, `concurrency` of them in flight."""
    pending = iter(requests)

    async def worker(tally: Tally) -> None:
        for req in pending:  # shared: each worker takes the next call
            t0 = time.perf_counter()
            try:
                response = await stub.Classify(req, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                tally.failed(e.code().name)
                continue
            tally.answered((time.perf_counter() - t0) * 1e3, response)

    async def load(tally: Tally) -> None:
        await asyncio.gather(*(worker(tally) for _ in range(concurrency)))

    return await measured(concurrency, len(requests), metrics_url, load)


async def run_stream_level(
    stub: pb2_grpc.SafetyClassifierStub,
    requests: list[pb2.ClassifyRequest],
    window: int,
    metadata: tuple,
    timeout: float,
    metrics_url: str | None,
) -> Row:
    """The same requests over one ClassifyStream with `window` unanswered at a time (the stream's analogue
    of `window` calls in flight); latency is from a request's write to its response."""
    free = asyncio.Semaphore(window)
    sent: list[float] = []

    async def produce() -> Any:
        for req in requests:
            await free.acquire()
            sent.append(time.perf_counter())
            yield req

    async def load(tally: Tally) -> None:
        deadline = timeout * max(1, len(requests) // window)  # the stream's, scaled from the per-call one
        async for answer in stub.ClassifyStream(produce(), metadata=metadata, timeout=deadline):
            free.release()
            if answer.HasField("error"):
                tally.failed(answer.error.status)
            else:
                tally.answered((time.perf_counter() - sent[answer.sequence]) * 1e3, answer.response)

    return await measured(window, len(requests), metrics_url, load)


def print_table(rows: list[Row], mix: str, items_per_call: int) -> None:
    print(f"mix={mix} items/call={items_per_call}")
    print(f"{'conc':>5} {'calls':>6} {'ok':>6} {'calls/s':>9} {'items/s':>9} {'tokens/s':>10} "
          f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'batch':>6} {'device':>6}  errors")  # fmt: skip
    for r in rows:
        batch = f"{r.avg_batch_sequences:6.1f}" if r.avg_batch_sequences is not None else f"{'-':>6}"
        busy = f"{r.device_busy:6.0%}" if r.device_busy is not None else f"{'-':>6}"
        print(f"{r.concurrency:>5} {r.calls:>6} {r.ok:>6} {r.calls_per_s:>9.1f} {r.items_per_s:>9.1f} "
              f"{r.tokens_per_s:>10.0f} {r.p50_ms:>8.2f} {r.p90_ms:>8.2f} {r.p99_ms:>8.2f} {batch} {busy}  "
              f"{r.errors or ''}")  # fmt: skip


async def main_async(args: argparse.Namespace) -> list[Row]:
    host = args.target.rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise SystemExit(f"--target must be a loopback address ({', '.join(LOOPBACK)}), got {args.target!r}")
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    rng = random.Random(args.seed)
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb2_grpc.SafetyClassifierStub(channel)
        ratio = await tokens_per_word(stub, metadata, rng)
        rows = []
        for c in args.concurrency:
            n_items = args.calls * args.items_per_call
            lengths = lengths_for(args.mix, n_items + args.warmup * args.items_per_call, args.seed + c)
            texts = [text_of(round((n - 2) / ratio), rng) for n in lengths]  # minus [CLS] and [SEP]
            reqs = [
                pb2.ClassifyRequest(items=[pb2.Item(text=t) for t in texts[i : i + args.items_per_call]])
                for i in range(0, len(texts), args.items_per_call)
            ]
            run = run_stream_level if args.stream else run_level
            if args.warmup:
                await run(stub, reqs[: args.warmup], c, metadata, args.timeout, None)
            rows.append(await run(stub, reqs[args.warmup :], c, metadata, args.timeout, args.metrics))
        return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--target", default="127.0.0.1:50051", help="HOST:PORT of a running server (loopback only)"
    )
    p.add_argument("--calls", type=int, default=500, help="measured calls per concurrency level")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                   help="comma-separated levels (default 1,8,32)")  # fmt: skip
    p.add_argument("--items-per-call", type=int, default=1)
    p.add_argument("--mix", default="traffic", help="traffic | fixed:N (tokens per item)")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured calls before each level")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    p.add_argument("--api-key", default=None)
    p.add_argument("--metrics", default=None, metavar="URL", help="e.g. http://127.0.0.1:9090/metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--stream", action="store_true",
                   help="one ClassifyStream per level; concurrency = requests unanswered")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(main_async(args))
    print_table(rows, args.mix, args.items_per_call)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
