"""CUDA-graph buckets: the pure padding layout (CPU), its equivalence to the unpadded batch, and the replay
itself where CUDA exists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from model import load_classifier
from model.graphs import GraphShape, graph_shapes, pad_lengths, pad_packed, pick_shape, token_levels
from model.packing import pack
from model.runner import Runner

CUDA = torch.cuda.is_available()


def _seqs(lengths: list[int]) -> list[list[int]]:
    return [[1, *[(5 * n + 3 * j) % 90 + 5 for j in range(n - 2)], 2] for n in lengths]


def test_token_levels_double_with_a_middle_step_from_2048() -> None:
    assert token_levels() == [256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384]
    assert token_levels(256, 4096) == [256, 512, 1024, 2048, 3072, 4096]
    assert token_levels(256, 255) == []


def test_buckets_cover_tokens_seqlen_and_slots_within_a_grid_bound() -> None:
    shapes = graph_shapes(8192)
    assert {s.tokens for s in shapes} == set(token_levels())
    assert {s.max_seqlen for s in shapes} == {128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192}
    for s in shapes:
        assert s.max_seqlen <= s.tokens and s.seqs <= max(16, s.tokens // 16)
        assert s.seqs * s.max_seqlen >= s.tokens // 2  # could be half filled
        assert s.blocks <= max(64, s.tokens // 4)
    assert shapes == sorted(shapes, key=lambda s: (s.tokens, s.blocks, s.seqs))
    # the one bucket kind before: max_seqlen = tokens, tokens / 16 slots; 4,096 tokens launched 8,224 blocks
    assert GraphShape(4096, 256, 4096).blocks == 32 * 257 and GraphShape(4096, 256, 4096) not in shapes
    # a short model: no sequence (real or pad) is longer than its positions, but the streams still are
    assert max(s.max_seqlen for s in graph_shapes(512)) == 512
    assert max(s.tokens for s in graph_shapes(512)) == 16384
    assert max(s.tokens for s in graph_shapes(8192, largest=4096)) == 4096
    assert graph_shapes(8192, largest=200) == []


def test_the_cheapest_fitting_bucket_is_picked() -> None:
    shapes = graph_shapes(8192)
    assert pick_shape(shapes, 128, 1, 128) == GraphShape(256, 16, 128)
    assert pick_shape(shapes, 129, 1, 129) == GraphShape(256, 16, 256)
    assert pick_shape(shapes, 256, 1, 256) == GraphShape(512, 16, 512)  # at least one pad token
    assert pick_shape(shapes, 200, 40, 10) == GraphShape(1024, 64, 128)  # too many sequences for 16 slots
    # 16 traffic items (H100 run 2: 10.4 ms a call in the 4,096 x 257 x 4,096 bucket): ~300 blocks now
    sixteen = pick_shape(shapes, 3200, 16, 1500)
    assert sixteen == GraphShape(4096, 16, 2048) and sixteen.blocks == 16 * (16 + 2)
    assert pick_shape(shapes, 16384, 1, 100) is None  # no bucket above the largest
    assert pick_shape(shapes, 9000, 1025, 100) is None  # more sequences than any bucket's slots
    assert pick_shape(shapes, 12000, 200, 8192) is None  # a grid too large for any bucket


def test_pad_lengths_put_empty_slots_first() -> None:
    assert pad_lengths(10, GraphShape(16, 2, 4)) == [0, 2, 4, 4]
    assert pad_lengths(8, GraphShape(16, 2, 4)) == [0, 0, 4, 4]
    assert pad_lengths(1, GraphShape(16, 2, 16)) == [1]


def test_padded_layout() -> None:
    batch = pack(_seqs([5, 3, 4]))
    padded = pad_packed(batch, GraphShape(24, 5, 5))  # 12 pad tokens in 5 pad slots of at most 5
    assert padded.input_ids.tolist() == batch.input_ids.tolist() + [0] * 12
    assert padded.positions.tolist() == [*batch.positions.tolist(), 0, 1, *range(5), *range(5)]
    assert padded.seq_index.tolist() == batch.seq_index.tolist() + [7] * 2 + [8] * 5 + [9] * 5
    assert padded.cu_seqlens.tolist() == [0, 5, 8, 12, 12, 12, 12, 12, 14, 19, 24]
    assert padded.cu_seqlens.dtype == torch.int32
    assert padded.lengths == (5, 3, 4, 0, 0, 0, 0, 2, 5, 5)
    assert padded.max_seqlen == 5
    # max_seqlen = tokens: the single pad sequence of the first bucket kind
    one = pad_packed(batch, GraphShape(16, 5, 16))
    assert one.cu_seqlens.tolist() == [0, 5, 8, 12, 12, 12, 16] and one.lengths == (5, 3, 4, 0, 0, 4)
    for shape in (GraphShape(12, 5, 5), GraphShape(64, 2, 5), GraphShape(64, 5, 4)):
        with pytest.raises(ValueError, match="does not fit"):
            pad_packed(batch, shape)


def test_every_bucket_lays_out_any_fitting_batch() -> None:
    """Random batches padded to every fitting bucket: the stream is the bucket's size, the slots its count,
    no sequence is longer than its max_seqlen, every sequence starts inside the stream (CLS pooling reads
    there), and positions and seq_index agree with cu_seqlens."""
    rng = np.random.default_rng(0)
    shapes = graph_shapes(8192)
    checked = 0
    for _ in range(300):
        lengths = rng.integers(1, rng.choice([128, 512, 2048, 8192]), size=rng.integers(1, 80)).tolist()
        batch = pack([[1] * n for n in lengths])
        for shape in (s for s in shapes if s.fits(batch.num_tokens, batch.num_seqs, batch.max_seqlen)):
            p = pad_packed(batch, shape)
            lens = np.asarray(p.lengths)
            cu = p.cu_seqlens.numpy()
            assert p.num_tokens == shape.tokens and len(lens) == shape.seqs + shape.pad_seqs
            assert lens.max() <= shape.max_seqlen == p.max_seqlen and (lens[batch.num_seqs :] >= 0).all()
            assert (cu[:-1] < shape.tokens).all() and cu[-1] == shape.tokens
            assert (np.diff(cu) == lens).all()
            assert (p.seq_index.numpy() == np.repeat(np.arange(len(lens)), lens)).all()
            assert (p.positions.numpy() == np.arange(shape.tokens) - np.repeat(cu[:-1], lens)).all()
            checked += 1
    assert checked > 300


@pytest.mark.parametrize(
    ("lengths", "shape"),
    [
        ([40, 3, 17, 9], GraphShape(160, 8, 160)),  # one long pad sequence: blocked local attention on it
        ([40, 3, 17, 9], GraphShape(160, 8, 40)),  # pad sequences [0, 11, 40, 40]
        ([30, 31], GraphShape(64, 4, 32)),  # dense band masks
        ([9], GraphShape(12, 1, 12)),  # no empty slot
        ([9], GraphShape(40, 1, 9)),  # pad sequences [0, 4, 9, 9, 9]
    ],
)
def test_padded_batch_gives_the_unpadded_logits(
    tiny_classifier, lengths: list[int], shape: GraphShape
) -> None:
    """The real rows of a padded batch equal the unpadded batch's logits: empty slots and pad sequences
    never reach a real sequence (checked with the CPU kernel; the varlen kernels keep sequences apart too)."""
    net, attn = tiny_classifier.runner.net, tiny_classifier.runner.attn
    batch = pack(_seqs(lengths))
    padded_batch = pad_packed(batch, shape)
    # the CPU kernel pads to the longest sequence; the bucket's max_seqlen only bounds the varlen grid
    padded_batch = dataclasses.replace(padded_batch, max_seqlen=max(padded_batch.lengths))
    with torch.inference_mode():
        plain = net(batch, attn)
        padded = net(padded_batch, attn)
    assert padded.shape[0] == shape.seqs + shape.pad_seqs
    assert torch.allclose(padded[: len(lengths)], plain, atol=1e-5)


def test_graphs_are_off_on_the_cpu_and_refused_when_asked_for(tiny_model_dir: Path, tiny_classifier) -> None:
    assert tiny_classifier.runner.graphs is None and tiny_classifier.graphs_text == "off"
    assert tiny_classifier.info()["cuda_graphs"] == "off"
    net = tiny_classifier.runner.net
    with pytest.raises(ValueError, match="cuda_graphs: CUDA graphs need a CUDA device"):
        Runner(net, torch.device("cpu"), torch.float32, graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_graph_replay_equals_the_ungraphed_forward(tiny_model_dir: Path, compile: bool) -> None:
    graphed = load_classifier(tiny_model_dir, device="cuda", compile=compile, graphs=True)
    plain = load_classifier(tiny_model_dir, device="cuda", compile=compile, graphs=False)
    assert graphed.runner.graphs is not None, graphed.runner.graph_error
    # one pad sequence, several, empty pad slots before them (the last: 8,192 tokens, pads [.., 168, 1024])
    for lengths in ([3], [100, 7, 33], [100] * 9, [1000, 5], [1000] * 7):
        seqs = _seqs(lengths)
        assert pick_shape(graphed.runner.graphs.shapes, sum(lengths), len(lengths), max(lengths)) is not None
        first = graphed.forward(seqs)
        assert torch.allclose(first, plain.forward(seqs), atol=0.05)
        # the pipeline keeps one batch queued ahead: a second replay must not overwrite the first's rows
        a, b = graphed.launch(seqs), graphed.launch(_seqs([17]))
        assert torch.equal(graphed.collect(a), first)
        assert torch.allclose(graphed.collect(b), plain.forward(_seqs([17])), atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_graphs_sharing_one_pool_replay_in_any_order(tiny_model_dir: Path) -> None:
    """Every graph's activations live in one pool: replays of different buckets, queued back to back in an
    order unlike the capture's (largest first), each still return their own batch's logits."""
    graphed = load_classifier(tiny_model_dir, device="cuda", graphs=True)
    plain = load_classifier(tiny_model_dir, device="cuda", graphs=False)
    graphs = graphed.runner.graphs
    assert graphs is not None and graphs.pool_bytes > 0 and "buckets up to 16384 tokens" in graphs.describe()
    batches = [_seqs(n) for n in ([3], [1000] * 7, [200, 7], [1000] * 15, [5] * 40, [3])]
    picked = {pick_shape(graphs.shapes, sum(map(len, b)), len(b), max(map(len, b))) for b in batches}
    assert None not in picked and len(picked) == 5
    launched = [graphed.launch(b) for b in batches]
    assert all(x.graphed for x in launched) and graphed.runner.replays >= len(batches)
    for x, b in zip(launched, batches, strict=True):
        assert torch.allclose(graphed.collect(x), plain.forward(b), atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_device_time_of_graphed_and_ungraphed_batches(tiny_model_dir: Path) -> None:
    """CUDA events time each batch on its stream: positive for a replay and an ungraphed forward alike, and
    batches queued back to back never count the same time twice (their sum fits in the wall time)."""
    import time

    clf = load_classifier(tiny_model_dir, device="cuda", graphs=True)
    small, large = _seqs([100, 7]), _seqs([1000] * 17)  # 17,000 tokens: above the top bucket, ungraphed
    assert pick_shape(clf.runner.graphs.shapes, 17000, 17, 1000) is None
    clf.forward(large)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    launched = [clf.launch(s) for s in (small, large, small, large)]
    assert [x.graphed for x in launched] == [True, False, True, False]
    for x in launched:
        clf.collect(x)
    wall = time.perf_counter() - t0
    seconds = [x.device_seconds() for x in launched]
    assert all(s > 0 for s in seconds) and sum(seconds) <= wall, (seconds, wall)
