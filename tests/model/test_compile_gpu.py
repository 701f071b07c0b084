"""Compiled vs eager (CPU here), and the GPU checks that run only where CUDA exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import load_classifier

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def test_compiled_equals_eager(tiny_model_dir: Path, tiny_classifier) -> None:
    compiled = load_classifier(tiny_model_dir, device="cpu", compile=True)
    assert compiled.runner.compiled
    seqs = [[1, *([7 + n % 50] * n), 2] for n in (3, 50, 300, 17)]
    assert torch.allclose(compiled.forward(seqs), tiny_classifier.forward(seqs), atol=1e-5)
    # a new bucket shape reuses the dynamic graph and still agrees
    seqs = [[1, *([9] * n), 2] for n in (5, 80)]
    assert torch.allclose(compiled.forward(seqs), tiny_classifier.forward(seqs), atol=1e-5)


@pytest.mark.gpu
@gpu
def test_a_compiled_cuda_engine_loads_and_equals_eager(tiny_model_dir: Path) -> None:
    """The load a compiled CUDA engine goes through (the server's default there): the first compile on a
    large batch, then the graph buckets' capture, the budget probe and the warm-up (its last batch
    ungraphed, of a token count that is not a multiple of 16); then eager's logits, replayed or not. The
    first compile once raised AttributeError (the runner set its graphs after it; test_runner.py takes the
    same path on the CPU)."""
    compiled = load_classifier(tiny_model_dir, device="cuda", compile=True)
    eager = load_classifier(tiny_model_dir, device="cuda", graphs=False)
    runner = compiled.runner
    assert runner.compiled and runner.graphs is not None, runner.graph_error
    assert {"compile_s", "graph_capture_s", "budget_probe_s"} <= set(runner.timings)
    assert compiled.warmup(max_length=256) > 0
    replays = runner.replays
    for lengths in ([3], [100, 7, 33], [1000] * 17 + [5]):  # the last: 17,005 tokens, above the top bucket
        seqs = [[1, *([7 + n % 50] * n), 2] for n in lengths]
        assert torch.allclose(compiled.forward(seqs), eager.forward(seqs), atol=0.05)
    assert runner.replays == replays + 2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["varlen", "sdpa"])
def test_bf16_gpu_parity_with_hf_fp32(tiny_model_dir: Path, backend: str) -> None:
    """bf16 on CUDA: error against HF fp32 within 2x HF-bf16's own error + 0.02 (as bench/gpu.py checks)."""
    from transformers import ModernBertForSequenceClassification

    from tests.model.parity_util import LENGTHS, hf_logits, random_ids

    seqs = random_ids(LENGTHS, 512)
    ref = hf_logits(ModernBertForSequenceClassification.from_pretrained(tiny_model_dir).eval(), seqs, 3)
    hf16 = ModernBertForSequenceClassification.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    hf16 = hf16.cuda()
    S = max(map(len, seqs))
    ids = torch.tensor([s + [3] * (S - len(s)) for s in seqs], device="cuda")
    mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in seqs], device="cuda")
    with torch.no_grad():
        hf_err = (hf16(input_ids=ids, attention_mask=mask).logits.float().cpu() - ref).abs().max().item()
    clf = load_classifier(tiny_model_dir, device="cuda", backend=backend)
    assert clf.dtype == "bfloat16"
    ours_err = (clf.forward(seqs) - ref).abs().max().item()
    assert ours_err <= 2 * hf_err + 0.02 * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@gpu
def test_launch_does_not_synchronize_with_the_device(tiny_model_dir: Path) -> None:
    """Lengths and max_seqlen live on the host: packing, copying and queueing a batch never waits for the
    device (torch raises on any synchronizing call in sync-debug mode "error")."""
    clf = load_classifier(tiny_model_dir, device="cuda")
    seqs = [[1, *([7] * n), 2] for n in (3, 50, 300, 17)]
    clf.forward(seqs)  # first use: allocator, kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = clf.launch(seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(clf.collect(launched), clf.forward(seqs))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_collect_waits_for_its_own_batch_not_the_ones_queued_behind_it(tiny_model_dir: Path, graphs) -> None:
    """Each batch's logits are copied back right behind its own forward: collecting batch i returns while
    the work queued after it still runs. (Copied in `collect`, the copy sat behind everything queued since,
    so with one batch queued ahead the host waited for two, and the device idled while it launched the
    next: H200, 86% busy on traffic.) A ~1 s device-side sleep stands in for a long next batch."""
    clf = load_classifier(tiny_model_dir, device="cuda")
    seqs = [[1, *([7] * n), 2] for n in (3, 50, 300, 17)]
    runner = clf.runner
    expected = runner.forward(seqs, graphs=graphs)  # first use: allocator, kernels
    launched = runner.launch(seqs, graphs=graphs)
    assert launched.graphed == (graphs and runner.graphs is not None)
    torch.cuda._sleep(2_000_000_000)  # cycles: ~1 s, queued behind the batch
    behind = torch.cuda.Event()
    behind.record()
    assert torch.equal(runner.collect(launched), expected)
    assert not behind.query(), "collect waited for the work queued behind its batch"
    torch.cuda.synchronize()


@pytest.mark.gpu
@gpu
def test_the_served_defaults_on_cuda_give_the_plain_engines_logits(tiny_model_dir: Path) -> None:
    """SAFETY_FUSED_GEMM and SAFETY_ATTENTION auto (the server's and workers' defaults): on a Hopper card the
    fused GEMMs and, without flash-attn, our kernel on the local layers; elsewhere the plain engine. Either
    way the plain engine's logits, replayed and not."""
    from model.attention import has_flash_attn
    from model.engine_settings import EngineSettings
    from model.runner import measured_card

    served = EngineSettings(model=str(tiny_model_dir), device="cuda", compile="off").load()
    plain = load_classifier(tiny_model_dir, device="cuda")
    hopper = measured_card(served.runner.device)
    assert served.runner.fused_gemm == hopper
    local = hopper and not has_flash_attn()
    assert served.runner.backend == ("triton_local" if local else plain.runner.backend)
    for lengths in ([3], [100, 7, 33], [1000] * 17 + [5]):  # the last above the top graph bucket
        seqs = [[1, *([7 + n % 50] * n), 2] for n in lengths]
        assert torch.allclose(served.forward(seqs), plain.forward(seqs), atol=0.05)


def test_copy_stream_only_on_cuda(tiny_classifier) -> None:
    assert tiny_classifier.runner._copy_stream is None  # the CPU computes in place: nothing to overlap


@pytest.mark.gpu
@gpu
def test_copy_stream_gives_the_same_logits(tiny_model_dir: Path) -> None:
    """Batches copied on their own stream (the compute stream waits for them on the device) give exactly
    the logits of copies on the compute stream, also with several batches queued back to back."""
    with_stream = load_classifier(tiny_model_dir, device="cuda")
    without = load_classifier(tiny_model_dir, device="cuda", copy_stream=False)
    assert with_stream.runner._copy_stream is not None and without.runner._copy_stream is None
    batches = [[[1, *([7 + k] * n), 2] for n in (3, 50, 300 + k)] for k in range(6)]
    for a, b in zip(with_stream.runner.run(batches), without.runner.run(batches), strict=True):
        assert torch.equal(a, b)
