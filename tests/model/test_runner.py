"""The runner's launch/collect split and its one-batch-ahead pipeline equal batch-by-batch forward."""

from __future__ import annotations

from pathlib import Path

import torch

from model import load_classifier


def _seqs(lengths: list[int]) -> list[list[int]]:
    return [[1, *[(7 * n + j) % 90 + 5 for j in range(n)], 2] for n in lengths]


def test_run_yields_each_batch_in_order(tiny_classifier) -> None:
    runner = tiny_classifier.runner
    batches = [_seqs([3, 40]), _seqs([100]), _seqs([5, 6, 7])]
    outs = list(runner.run(batches))
    assert [o.shape[0] for o in outs] == [2, 1, 3]
    for out, batch in zip(outs, batches, strict=True):
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        assert torch.equal(out, runner.forward(batch))
    assert list(runner.run([])) == []


def test_launched_batch_reports_its_device_time(tiny_classifier) -> None:
    """On the CPU the forward runs inside `launch`: its wall time is the batch's device time."""
    import time

    runner = tiny_classifier.runner
    t0 = time.perf_counter()
    launched = runner.launch(_seqs([300, 40, 7]))
    wall = time.perf_counter() - t0
    before = runner.device_seconds
    logits = runner.collect(launched)
    assert runner.device_seconds == before + launched.device_seconds()  # collect keeps the running total
    assert torch.equal(logits, runner.forward(_seqs([300, 40, 7])))
    assert 0 < launched.device_seconds() <= wall
    assert launched.start is None and launched.end is None  # no CUDA events off the GPU
    assert not launched.graphed and runner.replays == 0 and runner.launches >= 2


def test_run_windows_across_many_batches_matches_single_forwards(tiny_model_dir: Path) -> None:
    # a budget this small forces one batch per few sequences, so the pipeline hands over many times
    clf = load_classifier(
        tiny_model_dir, device="cpu", max_tokens=512, max_batch_tokens=512, max_batch_sequences=3
    )
    seqs = _seqs([300, 4, 17, 250, 9, 120, 33, 64, 1, 200])
    plan = clf.plan([len(s) for s in seqs])
    assert len(plan) >= 4
    together = clf.run_windows(seqs)
    one_by_one = torch.cat([clf.forward([s]) for s in seqs])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_a_wrong_device_or_dtype_is_an_input_error_not_a_bare_value_error() -> None:
    """A plain ValueError escaped `safety classify`'s handler (it catches SafetyError) as a traceback."""
    import pytest

    from model.errors import InvalidInputError
    from model.runner import resolve_device, resolve_dtype

    for device in ("tpu", "meta", "cuda:x"):
        with pytest.raises(InvalidInputError, match=r"^device: unsupported device .*; use auto, cpu or cuda"):
            resolve_device(device)
    with pytest.raises(InvalidInputError, match=r"^dtype: unknown dtype 'fp8'; choose from \['bf16'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_an_attention_backend_this_machine_cannot_run_is_an_input_error() -> None:
    """pick_backend's refusals (and the runner's) are InvalidInputError naming the setting, which the CLI
    and the servers report as one line, not a bare ValueError's traceback."""
    import pytest

    from model.attention import pick_backend
    from model.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"^backend: 'varlen' needs a CUDA device, got cpu"):
        pick_backend(torch.device("cpu"), "varlen")
    with pytest.raises(InvalidInputError, match=r"^backend: unknown attention backend 'nope'"):
        pick_backend(torch.device("cpu"), "nope")
