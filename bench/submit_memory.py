"""Client memory of `safety submit FILE`: its peak RSS and wall time by job size, against a private Redis.

`safety submit` validates every item before anything is stored, then stores and enqueues the job chunk by
chunk; no worker is needed (the chunks stay queued). Each size N gets a JSONL file of N items of about 200
characters (made once under --dir), submitted in a fresh process whose peak RSS is read from `wait4`.
--baseline DIR also submits with another checkout of the project (e.g. a `git worktree` of an older commit),
alternating with this one size by size, so both are measured in the same run.

Usage: python bench/submit_memory.py [--sizes 100000 500000 1000000] [--baseline DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 500_000, 1_000_000])
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to compare with")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "safety-submit-memory")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    checkouts = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
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
            for name, checkout in checkouts.items():
                row = {"items": n, "code": name, **submit(checkout, path, f"redis://127.0.0.1:{port}/0", "m")}
                rows.append(row)
                rss, wall = row["peak_rss_mb"], row["wall_s"]
                print(f"{n:>9} items  {name:<8}  peak RSS {rss:7.0f} MB  {wall:6.1f} s", flush=True)
                client.flushall()
    finally:
        server.kill()
        server.wait()
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "checkouts": {k: str(v) for k, v in checkouts.items()}})
        )


if __name__ == "__main__":
    main()
