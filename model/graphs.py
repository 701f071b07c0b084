"""CUDA graphs for small batches: one graph replay instead of launching every kernel from Python.

Why: on an H100 one 128-token item took 14.8 ms eager (16.5 ms compiled), of which 14.6 ms was the host
queueing ~500 kernels (docs/benchmarks.md): small batches are launch-bound, and a replay removes that cost.

Owns: the graph buckets (`GraphShape`), padding a packed batch to a bucket's fixed shape (pure host-side
arithmetic, unit-tested on the CPU), and `GraphSet`, which captures one graph per bucket and replays the
smallest that fits. A padded batch holds the real sequences, then zero-length sequences up to the bucket's
slot count, then one pad sequence with the remaining tokens (never empty). The varlen kernels never mix
sequences, so a real sequence sees exactly what it would unpadded; `max_seqlen` is the bucket's token
count, an upper bound for every batch it takes. Batches of 4,096 tokens or more run ungraphed.
Must not know: tokenizers, windows, thresholds, queues, gRPC, Celery.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.packing import Packed, pack

SMALLEST = 256  # tokens in the smallest bucket (a 128-token item plus its pad sequence fits)
# A graph fixes max_seqlen at its bucket's size, so the attention grid (max_seqlen / 128 x slots x heads
# blocks, most exiting at once) and the graph's memory pool grow with the bucket: stop at 4,096 tokens. Bigger
# batches come from a loaded queue, where the scheduler keeps two in flight and one's launch overlaps the
# other's compute.
LARGEST = 4096
SLOTS_PER_TOKEN = 16  # a bucket of T tokens takes up to T / 16 sequences (at least 16)


@dataclass(frozen=True)
class GraphShape:
    tokens: int  # stream length; a batch fits with fewer real tokens (the pad sequence is never empty)
    seqs: int  # real-sequence slots; the pad sequence takes one more

    def fits(self, num_tokens: int, num_seqs: int) -> bool:
        return num_tokens < self.tokens and num_seqs <= self.seqs


def graph_shapes(max_positions: int, smallest: int = SMALLEST, largest: int = LARGEST) -> list[GraphShape]:
    """Buckets doubling from `smallest` to `largest` tokens (none longer than the model's positions, since
    the pad sequence may be nearly that long), each with T / 16 sequence slots (at least 16)."""
    shapes, tokens = [], smallest
    while tokens <= min(largest, max_positions):
        shapes.append(GraphShape(tokens, max(16, tokens // SLOTS_PER_TOKEN)))
        tokens *= 2
    return shapes


def pick_shape(shapes: list[GraphShape], num_tokens: int, num_seqs: int) -> GraphShape | None:
    """The smallest bucket that takes the batch, or None (the batch runs ungraphed)."""
    fitting = [s for s in shapes if s.fits(num_tokens, num_seqs)]
    return min(fitting, key=lambda s: (s.tokens, s.seqs)) if fitting else None


def pad_packed(batch: Packed, shape: GraphShape) -> Packed:
    """A host batch laid out in `shape`: real sequences, zero-length sequences up to `shape.seqs`, then one
    pad sequence (token id 0, positions from 0) holding the rest of the stream. The first
    `batch.num_seqs` rows of the model's output are the batch's logits; the others are discarded."""
    T, B = batch.num_tokens, batch.num_seqs
    if not shape.fits(T, B):
        raise ValueError(f"a batch of {B} sequences and {T} tokens does not fit {shape}")
    pad = shape.tokens - T
    empty = shape.seqs - B
    cu = batch.cu_seqlens.numpy()
    return Packed(
        input_ids=torch.from_numpy(np.concatenate([batch.input_ids.numpy(), np.zeros(pad, np.int64)])),
        positions=torch.from_numpy(np.concatenate([batch.positions.numpy(), np.arange(pad, dtype=np.int64)])),
        seq_index=torch.from_numpy(
            np.concatenate([batch.seq_index.numpy(), np.full(pad, shape.seqs, np.int64)])
        ),
        cu_seqlens=torch.from_numpy(
            np.concatenate([cu, np.full(empty, T, np.int32), np.array([shape.tokens], np.int32)])
        ),
        lengths=(*batch.lengths, *([0] * empty), pad),
        max_seqlen=shape.tokens,
    )


def filler(shape: GraphShape) -> Packed:
    """A host batch of `shape` used to capture its graph: one 1-token sequence, the rest padding."""
    return pad_packed(pack([[0]]), shape)


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Packed  # static device buffers the replay reads
    logits: torch.Tensor  # static (seqs + 1, num_labels) output the replay writes


@dataclass(frozen=True)
class Prepared:
    """A host batch made ready for one graph: padded to its bucket, in pinned memory."""

    captured: Captured
    inputs: Packed
    num_seqs: int  # real sequences: the rows to return


class GraphSet:
    """One CUDA graph per bucket, captured from `forward` (the runner's network call: eager or compiled).
    `prepare` picks the smallest fitting graph and pads the batch for it on the host; `replay` runs it. Not
    thread-safe: the runner's lock serialises replays."""

    def __init__(
        self, forward: Callable[[Packed], torch.Tensor], shapes: list[GraphShape], device: torch.device
    ) -> None:
        self.forward = forward
        self.shapes = shapes
        self.device = device
        self.graphs: dict[GraphShape, Captured] = {}
        self.capture_s = 0.0

    def capture(self, warmups: int = 2) -> float:
        """Warm each bucket up on a side stream (compiles and autotunes outside the capture), then capture
        it. Returns the seconds taken."""
        t0 = time.perf_counter()
        for shape in self.shapes:
            inputs = filler(shape).to(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmups):
                    self.forward(inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.forward(inputs)
            self.graphs[shape] = Captured(graph, inputs, logits)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        return self.capture_s

    def prepare(self, batch: Packed) -> Prepared | None:
        """Host side: the bucket that takes this batch and the batch padded to it in pinned memory; None when
        no bucket does (run it ungraphed)."""
        shape = pick_shape(self.shapes, batch.num_tokens, batch.num_seqs)
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
