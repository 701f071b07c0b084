"""Attention tile utilisation, host arithmetic only (runs anywhere, no GPU): for each gpu-anchor workload, the
share of a varlen kernel's tile work that lies inside the sequence (global layers) or inside the sequence and
the ±window band (local layers), for square query/key tiles of a given size.

A kernel with FA2's grid gives every sequence ceil(L / B) query blocks; a global query block visits every key
block of its sequence, a local one the key blocks its rows' windows touch. Useful work is L² (global) or
Σ_i |{j : |i − j| <= window}| (local). FA2 in torch tiles by 128 for head dim 64.

Second table, the launch grids, on the batches the engine forms (model/planner.py under the H100's token
budget, 131,072 tokens and 2,048 sequences) and on the one unsorted pack of `bench/gpu.py`'s attention rows
(a workload's first 2,048 sequences): FA2's grid is ceil(max_seqlen / B) programs for every sequence of a
batch, and the programs past their sequence's end exit at once; model/triton_attention.py tiles the packed
stream (ceil(T / B) programs, none empty), a block spanning two sequences computing the tiles of both. Per
head: programs launched, the share of them with work, and the stream grid's tile work inside the sequence
or window. What a program or a tile costs on the device is not here: `bench/gpu.py` measures that.

    python bench/tiles.py --blocks 128,64 --window 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import anchor_workloads
from model.planner import plan_batches

BUDGET = (131072, 2048)  # the H100's token budget and the CUDA default of max_batch_sequences


def useful_pairs(length: int, window: int | None) -> int:
    """Query-key pairs a sequence needs: all of them (global), or those within the band (local)."""
    if window is None:
        return length * length
    return sum(min(length, i + window + 1) - max(0, i - window) for i in range(length))


def tile_work(length: int, block: int, window: int | None) -> int:
    """Query-key pairs the tiles of a FA2-style grid cover for one sequence."""
    blocks = -(-length // block)
    if window is None:
        return blocks * blocks * block * block
    total = 0
    for i in range(blocks):
        lo = max(0, i * block - window) // block
        hi = -(-min(length, (i + 1) * block + window) // block)
        total += (hi - lo) * block * block
    return total


def utilisation(lengths: list[int], block: int, window: int | None) -> float:
    return sum(useful_pairs(n, window) for n in lengths) / sum(tile_work(n, block, window) for n in lengths)


def stream_tile_work(lengths: list[int], block: int, window: int | None) -> int:
    """Query-key pairs the tiles of a stream grid cover for one packed batch: each block of `block` rows
    visits the key blocks from its first row's sequence start to its last row's sequence end (global), or
    those its rows' windows touch inside those sequences (local)."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    T = starts[-1]
    seq_of = [i for i, n in enumerate(lengths) for _ in range(n)]
    total = 0
    for m0 in range(0, T, block):
        first, last = seq_of[m0], seq_of[min(m0 + block, T) - 1]
        lo, hi = starts[first], starts[last + 1]
        if window is not None:
            lo, hi = max(lo, m0 - window), min(hi, m0 + block + window)
        total += block * block * -(-(hi - lo) // block)
    return total


def grids(batches: list[list[int]], block: int, window: int) -> dict[str, float]:
    """Per head, over `batches` (lengths of each): programs FA2's grid launches, the share with work, and
    the stream grid's programs and its tile work's useful share, global and local."""
    launched = working = stream = 0
    useful = {None: 0, window: 0}
    covered = {None: 0, window: 0}
    for lengths in batches:
        launched += -(-max(lengths) // block) * len(lengths)
        working += sum(-(-n // block) for n in lengths)
        stream += -(-sum(lengths) // block)
        for w in (None, window):
            useful[w] += sum(useful_pairs(n, w) for n in lengths)
            covered[w] += stream_tile_work(lengths, block, w)
    return {
        "seq_grid_programs": launched,
        "seq_grid_working": working / launched,
        "stream_programs": stream,
        "stream_global": useful[None] / covered[None],
        "stream_local": useful[window] / covered[window],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="128,64", help="tile sizes to compare")
    ap.add_argument("--window", type=int, default=64, help="a local layer's half window (ModernBERT: 64)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = []
    for name, wl in anchor_workloads().items():
        row = {"workload": name, "sequences": len(wl.lengths), "mean_length": wl.tokens / len(wl.lengths)}
        for b in blocks:
            row[f"global_{b}"] = utilisation(wl.lengths, b, None)
            row[f"local_{b}"] = utilisation(wl.lengths, b, args.window)
        rows.append(row)
    cols = [f"{kind}_{b}" for kind in ("global", "local") for b in blocks]
    print("| workload | " + " | ".join(c.replace("_", " layers, tiles of ") for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['workload']} | " + " | ".join(f"{r[c]:.0%}" for c in cols) + " |")
    launch_rows = []
    for name, wl in anchor_workloads().items():
        planned = [[wl.lengths[i] for i in b] for b in plan_batches(wl.lengths, *BUDGET)]
        for packs, batches in (("planner batches", planned), ("one pack of 2,048", [wl.lengths[:2048]])):
            for b in blocks:
                launch_rows.append(
                    {"workload": name, "batches": packs, "block": b, **grids(batches, b, args.window)}
                )
    heads = ["workload", "batches", "block", "FA2 grid: programs / head", "with work",
             "stream grid: programs / head", "its tiles' useful work, global", "local"]  # fmt: skip
    print("\n| " + " | ".join(heads) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in launch_rows:
        print(f"| {r['workload']} | {r['batches']} | {r['block']} | {r['seq_grid_programs']:,} | "
              f"{r['seq_grid_working']:.0%} | {r['stream_programs']:,} | {r['stream_global']:.0%} | "
              f"{r['stream_local']:.0%} |")  # fmt: skip
    if args.json:
        doc = {"window": args.window, "blocks": blocks, "rows": rows, "budget": BUDGET, "grids": launch_rows}
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
