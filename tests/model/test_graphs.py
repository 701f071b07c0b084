"""CUDA-graph buckets: the pure padding layout (CPU), its equivalence to the unpadded batch, and the replay
itself where CUDA exists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model import load_classifier
from model.graphs import GraphShape, graph_shapes, pad_packed, pick_shape
from model.packing import pack
from model.runner import Runner

CUDA = torch.cuda.is_available()


def _seqs(lengths: list[int]) -> list[list[int]]:
    return [[1, *[(5 * n + 3 * j) % 90 + 5 for j in range(n - 2)], 2] for n in lengths]


def test_buckets_double_up_to_the_largest_and_never_exceed_the_positions() -> None:
    shapes = graph_shapes(8192)
    assert [s.tokens for s in shapes] == [256, 512, 1024, 2048, 4096]
    assert [s.seqs for s in shapes] == [16, 32, 64, 128, 256]
    assert [s.tokens for s in graph_shapes(1000)] == [256, 512]
    assert graph_shapes(200) == []


def test_the_smallest_fitting_bucket_is_picked() -> None:
    shapes = graph_shapes(8192)
    assert pick_shape(shapes, 128, 1) == GraphShape(256, 16)
    assert pick_shape(shapes, 256, 1) == GraphShape(512, 32)  # the pad sequence is never empty
    assert pick_shape(shapes, 200, 40) == GraphShape(1024, 64)  # too many sequences for 256 and 512
    assert pick_shape(shapes, 4095, 256) == GraphShape(4096, 256)
    assert pick_shape(shapes, 4096, 1) is None
    assert pick_shape(shapes, 300, 257) is None


def test_padded_layout() -> None:
    batch = pack(_seqs([5, 3, 4]))
    padded = pad_packed(batch, GraphShape(16, 5))
    assert padded.input_ids.tolist() == batch.input_ids.tolist() + [0] * 4
    assert padded.positions.tolist() == [*batch.positions.tolist(), 0, 1, 2, 3]
    assert padded.seq_index.tolist() == batch.seq_index.tolist() + [5] * 4
    assert padded.cu_seqlens.tolist() == [0, 5, 8, 12, 12, 12, 16]
    assert padded.cu_seqlens.dtype == torch.int32
    assert padded.lengths == (5, 3, 4, 0, 0, 4)
    assert padded.max_seqlen == 16
    with pytest.raises(ValueError, match="does not fit"):
        pad_packed(batch, GraphShape(12, 5))
    with pytest.raises(ValueError, match="does not fit"):
        pad_packed(batch, GraphShape(64, 2))


@pytest.mark.parametrize(
    ("lengths", "shape"),
    [
        ([40, 3, 17, 9], GraphShape(160, 8)),  # long pad sequence: blocked local attention on the pad
        ([30, 31], GraphShape(64, 4)),  # dense band masks
        ([9], GraphShape(12, 1)),  # no empty slot
    ],
)
def test_padded_batch_gives_the_unpadded_logits(
    tiny_classifier, lengths: list[int], shape: GraphShape
) -> None:
    """The real rows of a padded batch equal the unpadded batch's logits: empty slots and the pad sequence
    never reach a real sequence (checked with the CPU kernel; the varlen kernels keep sequences apart too)."""
    net, attn = tiny_classifier.runner.net, tiny_classifier.runner.attn
    batch = pack(_seqs(lengths))
    padded_batch = pad_packed(batch, shape)
    # the CPU kernel pads to the longest sequence; the bucket's max_seqlen only bounds the varlen grid
    padded_batch = dataclasses.replace(padded_batch, max_seqlen=max(padded_batch.lengths))
    with torch.inference_mode():
        plain = net(batch, attn)
        padded = net(padded_batch, attn)
    assert padded.shape[0] == shape.seqs + 1
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
    for lengths in ([3], [100, 7, 33], [100] * 9, [1000, 5]):  # all under the 1024-token top bucket
        seqs = _seqs(lengths)
        assert pick_shape(graphed.runner.graphs.shapes, sum(lengths), len(lengths)) is not None
        first = graphed.forward(seqs)
        assert torch.allclose(first, plain.forward(seqs), atol=0.05)
        # the pipeline keeps one batch queued ahead: a second replay must not overwrite the first's rows
        a, b = graphed.launch(seqs), graphed.launch(_seqs([17]))
        assert torch.equal(graphed.collect(a), first)
        assert torch.allclose(graphed.collect(b), plain.forward(_seqs([17])), atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_device_time_of_graphed_and_ungraphed_batches(tiny_model_dir: Path) -> None:
    """CUDA events time each batch on its stream: positive for a replay and an ungraphed forward alike, and
    batches queued back to back never count the same time twice (their sum fits in the wall time)."""
    import time

    clf = load_classifier(tiny_model_dir, device="cuda", graphs=True)
    small, large = _seqs([100, 7]), _seqs([1000] * 6)  # 6,000 tokens: above the top bucket, ungraphed
    assert pick_shape(clf.runner.graphs.shapes, 6000, 6) is None
    clf.forward(large)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    launched = [clf.launch(s) for s in (small, large, small, large)]
    for x in launched:
        clf.collect(x)
    wall = time.perf_counter() - t0
    seconds = [x.device_seconds() for x in launched]
    assert all(s > 0 for s in seconds) and sum(seconds) <= wall, (seconds, wall)
