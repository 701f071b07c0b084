"""Client memory of `safety submit FILE`: its peak RSS and wall time by job size, against a private Redis.

`safety submit` validates every item before anything is stored, then stores and enqueues the job chunk by
chunk; no worker is needed (the chunks stay queued). Each size N gets a JSONL file of N items of about 200
characters (made once under --dir), submitted in a fresh process whose peak RSS is read from `wait4`.
--baseline DIR [DIR ...] also submits with other checkouts of the project (e.g. `git archive` of older
commits; each named by its directory's name), alternating with this one size by size, so all are measured
in the same run. --repeats N submits each size N times with each checkout, in rounds (each round starts with
the next checkout, so none always runs first), and prints the median of each: the wall time of a fresh
process on a busy VM varies by 10% or more from one run to the next.

Usage: python bench/submit_memory.py [--sizes 100000 500000 1000000] [--baseline DIR ...] [--repeats N]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis  # and nothing heavy (torch): a child's peak RSS counts the parent's pages it forked from

REPO = Path(__file__).resolve().parent.parent
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def items_file(directory: Path, n: int) -> Path:
    path = directory / f"items-{n}.jsonl"
    if not path.exists():
        rnd = random.Random(n)
        with open(path, "w") as f:
            for i in range(n):
                text = " ".join(rnd.choice(WORDS) for _ in range(40))[:200]
                f.write(json.dumps({"id": f"item-{i}", "text": text}) + "\n")
    return path


def submit(checkout: Path, path: Path, redis_url: str, job_id: str) -> dict[str, float]:
    """Peak RSS (MB) and wall time (s) of one `safety submit` run from `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "SAFETY_REDIS_URL": redis_url,
           "SAFETY_QUEUE": "submit-memory"}  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "submit", str(path), "--job-id", job_id],
        cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"safety submit from {checkout} failed: {stderr.strip()}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall}


def medians(rows: list[dict], names: list[str]) -> list[dict]:
    """Per size and checkout, the median peak RSS and wall time of its runs."""
    out = []
    for n in dict.fromkeys(row["items"] for row in rows):
        for name in names:
            runs = [row for row in rows if row["items"] == n and row["code"] == name]
            out.append({
                "items": n, "code": name, "runs": len(runs),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                "wall_s": statistics.median(r["wall_s"] for r in runs),
            })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 500_000, 1_000_000])
    ap.add_argument("--baseline", type=Path, nargs="+", default=[], help="other checkouts to compare with")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each size with each checkout")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "safety-submit-memory")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    checkouts = {"this": REPO} | {b.resolve().name: b.resolve() for b in args.baseline}
    if len(checkouts) != 1 + len(args.baseline):
        raise SystemExit("each --baseline needs a directory name of its own (and none named 'this')")
    names = list(checkouts)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=args.dir, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    rows = []
    try:
        for n in args.sizes:
            path = items_file(args.dir, n)
            for round_ in range(args.repeats):
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    run = submit(checkouts[name], path, f"redis://127.0.0.1:{port}/0", "m")
                    row = {"items": n, "code": name, "round": round_, **run}
                    rows.append(row)
                    rss, wall = row["peak_rss_mb"], row["wall_s"]
                    print(f"{n:>9} items  {name:<12}  peak RSS {rss:7.0f} MB  {wall:6.1f} s", flush=True)
                    client.flushall()
    finally:
        server.kill()
        server.wait()
    summary = medians(rows, names)
    print(f"medians of {args.repeats} run(s):")
    for m in summary:
        rss, wall = m["peak_rss_mb"], m["wall_s"]
        print(f"{m['items']:>9} items  {m['code']:<12}  peak RSS {rss:7.0f} MB  {wall:6.2f} s", flush=True)
    if args.json:
        paths = {k: str(v) for k, v in checkouts.items()}
        out = {"rows": rows, "medians": summary, "repeats": args.repeats, "checkouts": paths}
        args.json.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
