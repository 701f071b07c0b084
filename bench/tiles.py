"""Attention tile utilisation, host arithmetic only (runs anywhere, no GPU): for each gpu-anchor workload, the
share of a varlen kernel's tile work that lies inside the sequence (global layers) or inside the sequence and
the ±window band (local layers), for square query/key tiles of a given size.

A kernel with FA2's grid gives every sequence ceil(L / B) query blocks; a global query block visits every key
block of its sequence, a local one the key blocks its rows' windows touch. Useful work is L² (global) or
Σ_i |{j : |i − j| <= window}| (local). FA2 in torch tiles by 128 for head dim 64; model/triton_attention.py
by 64. What a tile costs on the device is not here: `bench/gpu.py`'s attention rows measure that.

    python bench/tiles.py --blocks 128,64 --window 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import anchor_workloads


def useful(length: int, window: int | None) -> int:
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
    return sum(useful(n, window) for n in lengths) / sum(tile_work(n, block, window) for n in lengths)


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
    if args.json:
        Path(args.json).write_text(
            json.dumps({"window": args.window, "blocks": blocks, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
