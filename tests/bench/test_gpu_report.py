"""bench/gpu.py's step guard: time limits, the deadline, a broken CUDA context, and the final table from a
partial run. A GPU call has one try at this (a hang or a sticky CUDA error once cost every later step and
the table), so it is checked here, on the CPU, with stand-ins for the device."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from bench import gpu
from bench.gpu import Report


def test_a_step_past_its_limit_is_stopped_with_a_traceback_and_the_run_goes_on(tmp_path: Path, capfd) -> None:
    rep = Report(str(tmp_path), {}, step_cap_s=1.0, health=lambda: None)

    def hang() -> None:
        with contextlib.suppress(Exception):  # a step's own handler (one engine's failure) must not
            time.sleep(30)  # swallow the time limit

    t0 = time.monotonic()
    assert rep.run("hang", hang, optional=False) is None
    assert time.monotonic() - t0 < 10
    assert rep.data["errors"]["hang"] == "StepTimeout: step 'hang' ran past its 1 s limit"
    assert rep.run("next", lambda: 42, key="answer") == 42
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["answer"] == 42 and set(saved["step_s"]) == {"hang", "next"}
    err = capfd.readouterr().err
    assert "Timeout (0:00:01)!" in err and ", line " in err and "in hang" in err  # where it was stuck


def test_optional_steps_are_skipped_from_the_deadline_and_stopped_at_it(tmp_path: Path) -> None:
    late = Report(str(tmp_path), {}, deadline_s=50, t0=time.monotonic() - 100, health=lambda: None)
    assert late.run("optional", lambda: 1) is None
    assert late.data["skipped"]["optional"] == "100 s into the run, 0 s before its deadline of 50 s"
    assert late.run("required", lambda: 2, optional=False) == 2  # parity and the workloads always run

    rep = Report(str(tmp_path), {}, deadline_s=1.5, t0=time.monotonic(), health=lambda: None)
    rep.MIN_STEP_S = 0.5
    t0 = time.monotonic()
    assert rep.run("runs into the deadline", lambda: time.sleep(30)) is None
    assert time.monotonic() - t0 < 10 and "StepTimeout" in rep.data["errors"]["runs into the deadline"]


def test_a_broken_cuda_context_skips_every_later_step(tmp_path: Path) -> None:
    states = iter([None, "AcceleratorError: CUDA error: an illegal memory access was encountered"])
    rep = Report(str(tmp_path), {}, health=lambda: next(states))

    def fault() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    assert rep.run("fine", lambda: 1) == 1
    assert rep.run("triton: fused_eager engine + parity", fault) is None
    assert rep.run("later", lambda: 1, optional=False) is None  # not even a required step runs
    assert rep.data["cuda_broken"].startswith("step 'triton: fused_eager engine + parity' (AcceleratorError")
    assert rep.data["skipped"]["later"].startswith("the CUDA context is unusable since step 'triton: fused")


def test_a_device_that_does_not_finish_counts_as_broken(tmp_path: Path) -> None:
    rep = Report(str(tmp_path), {}, health=lambda: time.sleep(30))
    rep.HEALTH_S = 1.0
    assert rep.run("queued a hang", lambda: 1) == 1
    assert "did not finish its queued work within 1 s" in rep.broken


def test_steps_do_not_nest(tmp_path: Path) -> None:
    rep = Report(str(tmp_path), {}, health=lambda: None)
    rep.run("outer", lambda: rep.run("inner", lambda: 1))
    assert rep.data["errors"]["outer"] == "RuntimeError: step 'inner' inside step 'outer'"


def test_emptying_the_cache_after_a_failure_never_raises(monkeypatch) -> None:
    def sticky() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu.torch.cuda, "empty_cache", sticky)
    gpu.free_cache()


def test_the_final_table_from_a_partial_run(capsys) -> None:
    gpu.final_table({
        "rows": [
            {"workload": "traffic", "hf_arrival": 40e3, "hf_sorted": 80e3, "ours_eager": 800e3,
             "ours_eager_runs": [780e3, 800e3, 820e3]},
            {"workload": "long_var", "hf_sorted": 100e3},  # ours failed here
        ],
        "triton_rows": [{"workload": "traffic", "fused_eager": 880e3}],
        "skipped": {"memory": "past the deadline"},
        "errors": {"workload long_var": "RuntimeError"},
    })  # fmt: skip
    out = capsys.readouterr().out
    assert "| traffic | 40.0k | 80.0k | 800.0k (±2.5%) | - | 10.0x | 20.0x | nan |" in out
    assert "| long_var | - | 100.0k | - | - | - | - | nan |" in out
    assert "| traffic | fused_eager | 880.0k | 1.10x |" in out
    assert "# steps skipped: ['memory']" in out and "# steps that failed: ['workload long_var']" in out


@pytest.mark.parametrize(("text", "want"), [
    ("0123456789abcdef0123 clean\n", {"hash": "0123456789abcdef0123", "dirty": False, "diff": None}),
    ("0123456789abcdef0123 dirty 5f3a9c1e\n", {"hash": "0123456789abcdef0123", "dirty": True,
                                               "diff": "5f3a9c1e"}),
])  # fmt: skip
def test_the_commit_comes_from_make_gpu_site(tmp_path: Path, monkeypatch, text: str, want: dict) -> None:
    (tmp_path / ".cache" / "gpu-site").mkdir(parents=True)
    (tmp_path / ".cache" / "gpu-site" / "COMMIT").write_text(text)
    monkeypatch.setattr(gpu, "ROOT", tmp_path)
    assert gpu.commit() == {**want, "source": "make gpu-site"}
