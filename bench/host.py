"""Host-side cost of the service path, per item, stage by stage: what one server process spends in Python
(under the GIL) for every item it classifies, apart from the model.

At GPU speed the host, not the model, bounds a server process: on an H100 the compiled model needs ~160 us
of device time per 190-token item, and every stage below runs on one interpreter thread at a time. This script
runs the stages the service runs for each request — parse the protobuf, validate, tokenize and window, form
batches from a queue, pack, read logits back, aggregate, build and serialize the response — on real texts
and a real tokenizer, without the model (logits are random: their values cost nothing to read), and prints
microseconds per item. Tokenization proper runs in Rust with the GIL released (in parallel on a many-core
host); the rest holds the GIL (encode's own Python work is timed with the Rust answers replayed). Best of
`--repeat` runs per stage.

    python bench/host.py                                   # bundled model's tokenizer, traffic mix
    python bench/host.py --model DIR --mix fixed:192 --items-per-call 16 --json out.json

Not covered: gRPC's own work (HTTP/2, the C core, its Cython callbacks on the event loop) and the
scheduler's thread hand-offs; `py-spy record --gil` on a loaded server shows those (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_us(fn: Callable[[], object], items: int, repeat: int) -> float:
    """Best wall time of `repeat` calls of fn, in microseconds per item."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / items * 1e6


class Replayed:
    """The Rust tokenizer's answers, computed once and handed back on each call: with it in place of the real
    one, `Classifier.encode` costs only its own Python work (converting the encodings, windowing, spans)."""

    def __init__(self, tokenizer, batches: list[list[str]]) -> None:
        self.answers = {tuple(b): tokenizer.encode_batch(b, add_special_tokens=False) for b in batches}

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list:
        return self.answers[tuple(texts)]


def form_batches(lengths: list[int], budget: int, max_sequences: int, pending: int) -> list[list[int]]:
    """What the scheduler's batch former does under load: `next_batch` over a queue kept at `pending`
    windows (arrival order), the chosen ones taken out. Returns batches of window indices."""
    from model.planner import next_batch

    queue: list[int] = []
    arrivals = iter(range(len(lengths)))
    batches = []
    while True:
        queue.extend(i for _, i in zip(range(pending - len(queue)), arrivals, strict=False))
        if not queue:
            return batches
        chosen = next_batch([lengths[i] for i in queue], budget, max_sequences)
        picked = set(chosen)
        batches.append([queue[k] for k in chosen])
        queue = [w for k, w in enumerate(queue) if k not in picked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--mix", default="traffic", help="traffic | fixed:N (tokens per item)")
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--items-per-call", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=131072, help="token budget (default: the H100's)")
    ap.add_argument("--pending", type=int, default=2048, help="windows queued while batches form")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from bench.e2e import make_texts
    from model import Rows, load_classifier
    from model.packing import pack
    from service.scheduler import Outcome
    from service.servicer import items_from_proto, response_from_outcome
    from service.stubs import pb2

    torch.set_num_threads(1)
    clf = load_classifier(args.model, device="cpu")
    texts = make_texts(clf, args.mix, args.items, args.seed)
    k = args.items_per_call
    raw = [
        pb2.ClassifyRequest(
            items=[pb2.Item(text=t, id=str(i)) for i, t in enumerate(texts[s : s + k])]
        ).SerializeToString()
        for s in range(0, len(texts), k)
    ]
    n, limit = len(texts), 1 << 20
    requests = [pb2.ClassifyRequest.FromString(r) for r in raw]
    calls = [clf.coerce_items(items_from_proto(r, 4096, limit)) for r in requests]
    th = clf.resolve_thresholds()
    encoded = [clf.encode(items) for items in calls]
    windows = [w for enc in encoded for e in enc for w in e.windows]
    lengths = [len(w) for w in windows]
    budget = max(args.batch_tokens, clf.limits.max_tokens)
    batches = form_batches(lengths, budget, 2048, args.pending)
    logits = [torch.randn(len(b), clf.config.num_labels) for b in batches]
    flat = Rows.of(clf, torch.randn(len(windows), clf.config.num_labels))
    owner = [(c, e) for c, enc in enumerate(encoded) for e in enc]
    first = [0]
    for _, e in owner:
        first.append(first[-1] + len(e.windows))
    results = [
        clf.aggregate_rows(e, flat.logits[a:b], flat.probs[a:b], th)
        for (_, e), a, b in zip(owner, first, first[1:], strict=False)
    ]
    by_call: list[list] = [[] for _ in calls]
    for (c, _), r in zip(owner, results, strict=True):
        by_call[c].append(r)
    outcomes = [Outcome(rs, 0.001, 0.002, 0.003) for rs in by_call]
    tokenizer = clf.tokenizer.tok

    stages: list[tuple[str, bool, Callable[[], object]]] = [
        ("parse ClassifyRequest", True, lambda: [pb2.ClassifyRequest.FromString(r) for r in raw]),
        ("validate (items_from_proto, coerce_items, thresholds)", True,
         lambda: [(clf.coerce_items(items_from_proto(r, 4096, limit)),
                   clf.resolve_thresholds(dict(r.thresholds))) for r in requests]),
        ("tokenize: Rust encode_batch (GIL released)", False,
         lambda: [tokenizer.encode_batch([it.text for it in items], add_special_tokens=False)
                  for items in calls]),
        ("window: Classifier.encode's Python part", True, lambda: [clf.encode(items) for items in calls]),
        ("form batches (next_batch over the queue)", True,
         lambda: form_batches(lengths, budget, 2048, args.pending)),
        ("pack (flat ids, positions, cu_seqlens)", True,
         lambda: [pack([windows[i] for i in b]) for b in batches]),
        ("read back (Rows.of: probabilities, tolist)", True, lambda: [Rows.of(clf, x) for x in logits]),
        ("aggregate_rows", True,
         lambda: [clf.aggregate_rows(e, flat.logits[a:b], flat.probs[a:b], th)
                  for (_, e), a, b in zip(owner, first, first[1:], strict=False)]),
        ("response_from_outcome + serialize", True,
         lambda: [response_from_outcome(o, clf.labels, th, False, clf.name).SerializeToString()
                  for o in outcomes]),
    ]  # fmt: skip
    rows_out = []
    real = clf.tokenizer.tok
    for name, gil, fn in stages:
        clf.tokenizer.tok = (
            Replayed(real, [[it.text for it in c] for c in calls]) if name.startswith("window") else real
        )
        fn()  # warm
        rows_out.append({"stage": name, "gil": gil, "us_per_item": best_us(fn, n, args.repeat)})
    clf.tokenizer.tok = real
    gil_us = sum(r["us_per_item"] for r in rows_out if r["gil"])
    tokens = sum(e.tokens for enc in encoded for e in enc)

    print(f"# bench/host.py  model={clf.path} mix={args.mix} items={n} items/call={k} "
          f"content tokens/item={tokens / n:.0f} windows/item={len(windows) / n:.2f} batches={len(batches)} "
          f"torch={torch.__version__} date={time.strftime('%Y-%m-%d')}")  # fmt: skip
    for r in rows_out:
        print(f"{r['stage']:<56} {r['us_per_item']:8.2f} us/item{'' if r['gil'] else '  (no GIL)'}")
    print(f"{'held the GIL, in all':<56} {gil_us:8.2f} us/item -> at most {1e6 / gil_us:,.0f} items/s "
          "per process from these stages alone")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "tokens_per_item": tokens / n, "windows_per_item": len(windows) / n,
             "stages": rows_out, "gil_us_per_item": gil_us},
            indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
