"""CUDA graphs for small and mid-size batches: one graph replay instead of launching every kernel from Python.

Why: on an H100 one 128-token item took 14.8 ms eager (16.5 ms compiled), of which 14.6 ms was the host
queueing ~500 kernels (docs/benchmarks.md): batches whose compute is shorter than their launch are
launch-bound, and a replay removes that cost.

Owns: the graph buckets (`GraphShape`: tokens, sequence slots, `max_seqlen`), padding a packed batch to a
bucket's fixed shape (pure host-side arithmetic, unit-tested on the CPU), and `GraphSet`, which captures one
graph per bucket into one shared memory pool and replays the cheapest that fits. A padded batch holds the real
sequences, then empty slots up to the bucket's slot count, then pad sequences of at most `max_seqlen` tokens
holding the rest of the stream (empty ones first, so every sequence starts inside the stream). The varlen
kernels never mix sequences, so a real sequence sees exactly what it would unpadded.

A graph fixes `max_seqlen`, and the varlen kernel launches ceil(max_seqlen / 128) query blocks for every
sequence slot and head, most of which exit at once for short sequences. So buckets are keyed by
`max_seqlen` too, and a bucket whose grid would be large for its token count is not made: the one bucket
kind before (`max_seqlen` = tokens = 4,096, 257 slots) launched 8,224 blocks per head where 16 traffic
items need ~30, and a 16-item call took 10.4 ms on an H100.
Must not know: tokenizers, windows, thresholds, queues, gRPC, Celery.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.packing import Packed, pack

SMALLEST = 256  # tokens in the smallest bucket (a 128-token item plus a pad sequence fits)
# Above ~16k tokens a batch's compute outlasts its eager launch (H100: ~20 ms launch, ~700k tok/s), and the
# scheduler keeps two batches in flight, so one's launch overlaps the other's compute: no graph needed.
LARGEST = 16384
SEQLEN_LEVELS = (128, 512, 2048, 8192)  # max_seqlen of a bucket (clipped to its tokens and the positions)
SLOT_LEVELS = (16, 64, 256, 1024)  # sequence slots, up to tokens / 16 (which is always a level too)
QUERY_BLOCK = 128  # rows of one query block in the flash varlen kernels (head dim 64)
BLOCKS_PER_TOKEN = 1 / 4  # a bucket launches at most tokens / 4 query blocks per head (at least 64)


@dataclass(frozen=True)
class GraphShape:
    tokens: int  # stream length; a batch fits with fewer real tokens (at least one pad token)
    seqs: int  # real-sequence slots
    max_seqlen: int  # the longest sequence it takes; pad sequences are at most this long

    @property
    def pad_seqs(self) -> int:
        """Pad-sequence slots: enough for the most pad tokens a batch can leave (tokens - 1)."""
        return -(-(self.tokens - 1) // self.max_seqlen)

    @property
    def blocks(self) -> int:
        """Query blocks the varlen kernel launches per head: every slot gets ceil(max_seqlen / 128)."""
        return -(-self.max_seqlen // QUERY_BLOCK) * (self.seqs + self.pad_seqs)

    def fits(self, num_tokens: int, num_seqs: int, max_seqlen: int) -> bool:
        return num_tokens < self.tokens and num_seqs <= self.seqs and max_seqlen <= self.max_seqlen

    def cost(self) -> tuple[int, int, int]:
        """Sort key, cheapest first: fewest tokens (compute), then fewest query blocks, then fewest slots."""
        return self.tokens, self.blocks, self.seqs


def token_levels(smallest: int = SMALLEST, largest: int = LARGEST) -> list[int]:
    """Bucket sizes: doubling from `smallest`, with a 1.5x step between from 2,048 up (padding a batch of a
    few thousand tokens to the next power of two would cost more compute than a small batch's launch)."""
    levels, tokens = [], smallest
    while tokens <= largest:
        levels.append(tokens)
        if tokens >= 2048 and tokens * 3 // 2 <= largest:
            levels.append(tokens * 3 // 2)
        tokens *= 2
    return levels


def graph_shapes(max_positions: int, smallest: int = SMALLEST, largest: int = LARGEST) -> list[GraphShape]:
    """The buckets for a model of `max_positions`: every token level x `max_seqlen` level (up to the tokens
    and the positions) x slot level (up to tokens / 16), except buckets that could not be half filled
    (slots x max_seqlen < tokens / 2) or whose attention grid is large for their size (`BLOCKS_PER_TOKEN`).
    Ordered by cost: fewest tokens, then fewest query blocks."""
    shapes = []
    for tokens in token_levels(smallest, largest):
        slots = max(SLOT_LEVELS[0], tokens // 16)
        for seqlen in sorted({min(level, tokens, max_positions) for level in SEQLEN_LEVELS}):
            for seqs in sorted({s for s in SLOT_LEVELS if s < slots} | {slots}):
                shape = GraphShape(tokens, seqs, seqlen)
                if seqs * seqlen >= tokens // 2 and shape.blocks <= max(64, tokens * BLOCKS_PER_TOKEN):
                    shapes.append(shape)
    return sorted(shapes, key=GraphShape.cost)


def pick_shape(
    shapes: list[GraphShape], num_tokens: int, num_seqs: int, max_seqlen: int
) -> GraphShape | None:
    """The first bucket of `shapes` (ordered by cost, as `graph_shapes` returns them) that takes the batch,
    or None (the batch runs ungraphed)."""
    return next((s for s in shapes if s.fits(num_tokens, num_seqs, max_seqlen)), None)


def pad_lengths(pad: int, shape: GraphShape) -> list[int]:
    """Lengths of the pad-sequence slots holding `pad` tokens: empty ones first, then the remainder, then
    full `max_seqlen` ones (so the last slot is never empty and every slot starts inside the stream)."""
    full, rest = divmod(pad, shape.max_seqlen)
    used = full + (rest > 0)
    return [0] * (shape.pad_seqs - used) + ([rest] if rest else []) + [shape.max_seqlen] * full


def pad_packed(batch: Packed, shape: GraphShape) -> Packed:
    """A host batch laid out in `shape`: real sequences, empty slots up to `shape.seqs`, then pad sequences
    (token id 0, positions from 0 in each). The first `batch.num_seqs` rows of the model's output are the
    batch's logits; the others are discarded."""
    T, B = batch.num_tokens, batch.num_seqs
    if not shape.fits(T, B, batch.max_seqlen):
        raise ValueError(
            f"a batch of {B} sequences and {T} tokens, the longest {batch.max_seqlen}, does not fit {shape}"
        )
    pad_total = shape.tokens - T
    pads = pad_lengths(pad_total, shape)
    pad_lens = np.asarray(pads, dtype=np.int64)  # (K,)
    pad_starts = np.cumsum(pad_lens) - pad_lens  # (K,) offsets inside the padding
    cu = batch.cu_seqlens.numpy()
    return Packed(
        input_ids=torch.from_numpy(np.concatenate([batch.input_ids.numpy(), np.zeros(pad_total, np.int64)])),
        positions=torch.from_numpy(
            np.concatenate([batch.positions.numpy(), np.arange(pad_total) - np.repeat(pad_starts, pad_lens)])
        ),
        seq_index=torch.from_numpy(
            np.concatenate([batch.seq_index.numpy(), np.repeat(shape.seqs + np.arange(len(pads)), pad_lens)])
        ),
        cu_seqlens=torch.from_numpy(
            np.concatenate(
                [cu, np.full(shape.seqs - B, T, np.int32), (T + np.cumsum(pad_lens)).astype(np.int32)]
            )
        ),
        lengths=(*batch.lengths, *([0] * (shape.seqs - B)), *pads),
        max_seqlen=shape.max_seqlen,
    )


def filler(shape: GraphShape) -> Packed:
    """A host batch of `shape` used to capture its graph: one 1-token sequence, the rest padding."""
    return pad_packed(pack([[0]]), shape)


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Packed  # static device buffers the replay reads
    logits: torch.Tensor  # static (seqs + pad_seqs, num_labels) output the replay writes


@dataclass(frozen=True)
class Prepared:
    """A host batch made ready for one graph: padded to its bucket, in pinned memory."""

    captured: Captured
    inputs: Packed
    num_seqs: int  # real sequences: the rows to return


class GraphSet:
    """One CUDA graph per bucket, captured from `forward` (the runner's network call: eager or compiled).
    `prepare` picks the cheapest fitting graph and pads the batch for it on the host; `replay` runs it. Not
    thread-safe: the runner's lock serialises replays, on one stream, which is what lets every graph share
    one memory pool (a graph's activations are dead once it has run, and `replay` copies its output out
    before the next replay can overwrite it)."""

    def __init__(
        self, forward: Callable[[Packed], torch.Tensor], shapes: list[GraphShape], device: torch.device
    ) -> None:
        self.forward = forward
        self.shapes = sorted(shapes, key=GraphShape.cost)  # `prepare` takes the first that fits
        self.device = device
        self.graphs: dict[GraphShape, Captured] = {}
        self.capture_s = 0.0
        self.pool_bytes = 0  # device memory the graphs hold (their shared pool and static buffers)

    def capture(self, warmups: int = 2) -> float:
        """Warm each bucket up on a side stream (compiles and autotunes outside the capture), then capture
        it into the shared pool, largest first so the smaller graphs reuse its memory. Returns the seconds
        taken."""
        t0 = time.perf_counter()
        torch.cuda.empty_cache()  # so the reserved-memory difference below is what the graphs hold
        reserved = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        for shape in sorted(self.shapes, key=lambda s: (s.tokens, s.seqs, s.max_seqlen), reverse=True):
            inputs = filler(shape).to(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmups):
                    self.forward(inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(inputs)
            self.graphs[shape] = Captured(graph, inputs, logits)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        torch.cuda.empty_cache()  # the warm-ups' cached blocks; the graphs' pool and buffers stay
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - reserved
        return self.capture_s

    def describe(self) -> str:
        top = max(s.tokens for s in self.shapes)
        return (
            f"{len(self.shapes)} buckets up to {top} tokens (captured in {self.capture_s:.1f} s, "
            f"{self.pool_bytes / 2**30:.2f} GiB)"
        )

    def prepare(self, batch: Packed) -> Prepared | None:
        """Host side: the bucket that takes this batch and the batch padded to it in pinned memory; None when
        no bucket does (run it ungraphed)."""
        shape = pick_shape(self.shapes, batch.num_tokens, batch.num_seqs, batch.max_seqlen)
        if shape is None:
            return None
        return Prepared(self.graphs[shape], pad_packed(batch, shape).pin_memory(), batch.num_seqs)

    @staticmethod
    def replay(prepared: Prepared) -> torch.Tensor:
        """Device side, on the current stream: copy the padded batch into the graph's input buffers, replay
        it, and return a fresh copy of the real rows (the next replay overwrites the static output)."""
        captured = prepared.captured
        for dst, src in zip(captured.inputs.tensors(), prepared.inputs.tensors(), strict=True):
            dst.copy_(src, non_blocking=True)
        captured.graph.replay()
        return captured.logits[: prepared.num_seqs].clone()
