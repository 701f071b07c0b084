"""CUDA-graph bucket coverage, host arithmetic only (runs anywhere, no GPU): for batches of N items drawn from
the traffic mix, how many fit a graph bucket, how full the chosen bucket is, and how many query blocks per
head its attention grid launches, against the blocks the batch's own sequences need. Compares the first
bucket kind (`max_seqlen` = tokens, tokens / 16 slots, up to 4,096 tokens) with today's `graph_shapes`.

What a replay costs on the device is not here: `bench/gpu.py` measures that (small-batch calls, graphs off,
first buckets, today's). This shows which batches each bucket set can replay at all, and the grid waste
(blocks that exit at once) it launches for them.

    python bench/buckets.py --batches 1000 --items 1,4,16,28,64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import anchor_workloads
from model.graphs import QUERY_BLOCK, GraphShape, graph_shapes, pick_shape

# the first bucket kind (sessions 4-6): max_seqlen = tokens, tokens / 16 slots, one pad sequence, up to 4,096
FIRST_BUCKETS = [GraphShape(t, max(16, t // 16), t) for t in (256, 512, 1024, 2048, 4096)]


def coverage(shapes: list[GraphShape], batches: list[list[int]]) -> dict:
    """Share of `batches` (token lengths) some bucket takes; for those, the mean fill (real tokens / bucket
    tokens), query blocks launched per head, and blocks the sequences need."""
    fill, launched, needed = [], [], []
    for lengths in batches:
        shape = pick_shape(shapes, sum(lengths), len(lengths), max(lengths))
        if shape is None:
            continue
        fill.append(sum(lengths) / shape.tokens)
        launched.append(shape.blocks)
        needed.append(sum(-(-n // QUERY_BLOCK) for n in lengths))
    mean = lambda xs: statistics.fmean(xs) if xs else 0.0  # noqa: E731
    return {"graphed": len(fill) / len(batches), "fill": mean(fill), "blocks": mean(launched),
            "blocks_needed": mean(needed)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=1000, help="random batches per size")
    ap.add_argument("--items", default="1,4,16,28,64", help="items per batch")
    ap.add_argument("--positions", type=int, default=8192, help="the model's max_position_embeddings")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    lengths = anchor_workloads()["traffic"].lengths
    sets = {"first": FIRST_BUCKETS, "today": graph_shapes(args.positions)}
    rng = random.Random(0)
    rows = []
    print(f"# buckets: first {len(sets['first'])}, today {len(sets['today'])}; traffic mix, {args.batches} "
          f"random batches per size")  # fmt: skip
    print("| items | tokens (mean) | set | graphed | fill | query blocks per head | blocks needed |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.items.split(",")):
        batches = [rng.choices(lengths, k=n) for _ in range(args.batches)]
        tokens = statistics.fmean(sum(b) for b in batches)
        for name, shapes in sets.items():
            row = {"items": n, "tokens": tokens, "set": name, **coverage(shapes, batches)}
            rows.append(row)
            print(f"| {n} | {tokens:,.0f} | {name} | {row['graphed']:.0%} | {row['fill']:.2f} | "
                  f"{row['blocks']:,.0f} | {row['blocks_needed']:,.0f} |")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"buckets": {k: len(v) for k, v in sets.items()}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
