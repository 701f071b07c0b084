"""Batch-job throughput: submit -> Celery workers -> results, against the classifier called directly.

Measures items/s for one N-item job (default 10,000) through the whole queue path (validation, upload to
Redis, one task per chunk, worker processes, per-item result writes, reading every result back in order)
with 1 and 2 worker processes, and the same items classified directly in one process in the same chunks.
The direct run is timed before and after the queued runs (the better counts). On a shared machine the
end-to-end ratios move with other load; the "queue overhead" column (end-to-end time minus the busiest
worker process's time inside `classify`, read from its log) isolates the queue path's own cost. A fresh
`redis-server` (no persistence) is started on a free port; workers are real `safety worker` subprocesses,
warmed up with a small job first so model loading is not timed. Model: --model DIR, else $SAFETY_MODEL,
else the bundled default, else a random ModernBERT of --shape (built with transformers; random weights do
not change the timing).
Usage: python bench/worker.py [--n 10000] [--workers 1 2] [--shape tiny|small|base] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# SHAPES: a random ModernBERT when no checkpoint is given; `tiny` makes the queue path's own cost visible.
from bench.workloads import SHAPES, free_port

VOCABULARY = (
    "the a to of and in is you it that for on with this be are not have how do i what can your my me please "
    "tell write explain story code bread weather attack recipe ignore previous instructions friend hurt "
    "python garden movie hate kill process music travel paris dog help safe rules"
)
WORDS = VOCABULARY.split(" ")


def make_items(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Moderation-like traffic: log-normal word counts around 25, a long tail, 20% responses."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        words = max(3, min(1500, round(math.exp(math.log(25) + rng.gauss(0, 0.9)))))
        item = {"id": str(i), "text": " ".join(rng.choice(WORDS) for _ in range(words))}
        if rng.random() < 0.2:
            item |= {"role": "response", "context": " ".join(rng.choice(WORDS) for _ in range(12))}
        items.append(item)
    return items


def resolve_model(args: argparse.Namespace, tmp: Path) -> str:
    if args.model or os.environ.get("SAFETY_MODEL"):
        return args.model or os.environ["SAFETY_MODEL"]
    default = Path(__file__).resolve().parent.parent / "model" / "default"
    if (default / "config.json").exists():
        return str(default)
    import torch
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from model.tokenizer import train_tokenizer

    special = dict(pad_token_id=3, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2)
    head = dict(num_labels=7, classifier_pooling="mean", problem_type="multi_label_classification")
    cfg = ModernBertConfig(**SHAPES[args.shape], **special, **head, vocab_size=512)
    torch.manual_seed(0)
    ModernBertForSequenceClassification(cfg).save_pretrained(tmp, safe_serialization=True)
    train_tokenizer([VOCABULARY] * 20, vocab_size=512, min_frequency=1).save(str(tmp / "tokenizer.json"))
    return str(tmp)


def direct(model: str, items: list[dict[str, str]], chunk_size: int) -> tuple[float, int]:
    """Seconds to classify every item in one process, chunk by chunk, and the content tokens seen."""
    from model import load_classifier

    clf = load_classifier(model, device="cpu")
    clf.classify(items[:chunk_size])  # warm-up, as the workers get
    t0 = time.perf_counter()
    tokens = 0
    for lo in range(0, len(items), chunk_size):
        tokens += sum(r.tokens for r in clf.classify(items[lo : lo + chunk_size]))
    return time.perf_counter() - t0, tokens


def busy_seconds(log: str, job: str) -> float:
    """The longest total classification time of one pool process for `job`, from the worker's INFO log."""
    pattern = rf"INFO/(\S+)\] job {re.escape(job)} chunk \d+: \d+ items in ([\d.]+)s"
    per_process: dict[str, float] = {}
    for process, seconds in re.findall(pattern, log):
        per_process[process] = per_process.get(process, 0.0) + float(seconds)
    return max(per_process.values())


def queued(
    model: str, items: list[dict[str, str]], chunk_size: int, workers: int, redis_url: str, log: Path
) -> dict:
    from worker.jobs import JobClient
    from worker.settings import WorkerSettings

    queue = f"bench{workers}"
    env = {**os.environ, "SAFETY_REDIS_URL": redis_url, "SAFETY_MODEL": model, "SAFETY_DEVICE": "cpu",
           "SAFETY_QUEUE": queue}  # fmt: skip
    cmd = [sys.executable, "-m", "worker.cli", "worker", "--pool=prefork", f"--concurrency={workers}",
           "--loglevel=INFO"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = JobClient(WorkerSettings(redis_url=redis_url, queue=queue, chunk_size=chunk_size))
    try:
        for k in range(workers):  # each pool process loads its model on its first chunk
            warm = client.submit(make_items(chunk_size * workers, seed=100 + k)).status.job_id
            client.wait(warm, timeout=900)
        t0 = time.perf_counter()
        job = client.submit(items).status.job_id
        t_submit = time.perf_counter() - t0
        status = client.wait(job, timeout=7200, poll_s=0.05)
        t_done = time.perf_counter() - t0
        count = sum(1 for _ in client.results(job))
        t_total = time.perf_counter() - t0
        assert (status.state, status.failed, count) == ("done", 0, len(items)), (status, count)
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)
    busy = busy_seconds(log.read_text(), job)
    return {"workers": workers, "submit_s": t_submit, "done_s": t_done, "total_s": t_total, "busy_s": busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="items in the job")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes to try")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--model", default=None, help="checkpoint directory")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small", help="random model when none given")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("bench/worker.py needs redis-server on PATH")

    items = make_items(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        model = resolve_model(args, Path(tmp) / "model")
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                  "--dir", tmp], stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(0.5)
            direct_s, tokens = direct(model, items, args.chunk_size)
            url = f"redis://127.0.0.1:{port}/0"
            runs = [
                queued(model, items, args.chunk_size, w, url, Path(tmp) / f"w{w}.log") for w in args.workers
            ]
            direct_s = min(direct_s, direct(model, items, args.chunk_size)[0])  # before and after: the best
        finally:
            redis.kill()
            redis.wait()

    n = args.n
    print(f"{n} items, {tokens} content tokens ({tokens / n:.0f}/item), chunks of {args.chunk_size}, "
          f"model {model if args.model else args.shape}, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| path | processes | items/s | vs direct | submit s | all done s | + read results s "
          "| classifying s | queue overhead s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    d = n / direct_s
    print(f"| direct `classify` | 1 | {d:.1f} | 1.00x | – | {direct_s:.1f} | – | {direct_s:.1f} | – |")
    for r in runs:
        rate, total, busy = n / r["total_s"], r["total_s"], r["busy_s"]
        cells = [
            "submit → worker → results", r["workers"], f"{rate:.1f}", f"{rate / d:.2f}x",
            f"{r['submit_s']:.2f}", f"{r['done_s']:.1f}", f"{total - r['done_s']:.2f}", f"{busy:.1f}",
            f"{total - busy:.1f} ({(total - busy) / total:.0%})",
        ]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\nclassifying s: the busiest worker process's time inside `classify` (from its log).")
    print(
        "queue overhead: end-to-end minus that (submit, dispatch, Redis reads and writes, reading results)."
    )
    if args.json:
        out = {"n": n, "tokens": tokens, "chunk_size": args.chunk_size, "direct_s": direct_s, "runs": runs}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
