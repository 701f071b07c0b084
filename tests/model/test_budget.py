"""The batch token budget: pure sizing arithmetic, the CPU default, and the CUDA probe against a simulated
device memory (the one thing here that cannot run without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import load_classifier
from model.budget import CPU_BUDGET, GPU_CAP, device_budget, fit_budget, probe_shape

KIB, GIB = 1024, 2**30


def test_fit_budget_is_bound_by_memory_then_aligned() -> None:
    # half of 1 GiB at 32 KiB per token = 16384 tokens exactly
    assert fit_budget(GIB, 32 * KIB, floor=8192, cap=131072) == (16384, "device memory")
    # 40 KiB per token: 13107.2 -> rounded down to a multiple of 1024
    assert fit_budget(GIB, 40 * KIB, floor=8192, cap=131072) == (12288, "device memory")
    assert fit_budget(GIB, 40 * KIB, floor=1, cap=131072, align=1) == (13107, "device memory")


def test_fit_budget_clamps_to_the_cap_and_the_longest_window() -> None:
    assert fit_budget(80 * GIB, 30 * KIB, floor=8192) == (GPU_CAP, "cap")
    assert fit_budget(80 * GIB, 30 * KIB, floor=8192, cap=262144) == (262144, "cap")
    # a card too small for even one window of max_tokens still gets one window per batch
    assert fit_budget(64 * 2**20, 30 * KIB, floor=8192) == (8192, "floor")
    assert fit_budget(2 * GIB, 32 * KIB, floor=8192, fraction=0.25) == (16384, "device memory")


def test_fit_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="bytes_per_token"):
        fit_budget(GIB, 0, floor=1)
    with pytest.raises(ValueError, match="floor"):
        fit_budget(GIB, 1, floor=10, cap=5)


def test_probe_shape_uses_the_longest_window() -> None:
    assert probe_shape(8192) == (8192, 4)
    assert probe_shape(512) == (512, 64)
    assert probe_shape(65536) == (65536, 1)


def test_cpu_budget_is_fixed() -> None:
    calls = []
    budget = device_budget(torch.device("cpu"), calls.append, 8192)
    assert (budget.tokens, budget.source, calls) == (CPU_BUDGET, "cpu default", [])
    assert device_budget(torch.device("cpu"), calls.append, 32768).tokens == 32768


class FakeCuda:
    """Allocator counters of a device with `total` bytes where a forward holds `per_token` bytes per token
    at its peak; enough of `torch.cuda` for the probe."""

    def __init__(self, total: int, resident: int, per_token: int) -> None:
        self.total, self.allocated, self.peak, self.per_token = total, resident, resident, per_token

    def forward(self, sequences: list[list[int]]) -> None:
        self.peak = max(self.peak, self.allocated + self.per_token * sum(map(len, sequences)))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(cuda, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(cuda, "mem_get_info", lambda *a: (self.total - self.allocated, self.total))


def test_cuda_budget_comes_from_the_measured_bytes_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # a 24 GiB card with 4 GiB of weights and 256 KiB per token: half of 20 GiB holds 40960 tokens
    fake = FakeCuda(total=24 * GIB, resident=4 * GIB, per_token=256 * KIB)
    fake.install(monkeypatch)
    budget = device_budget(torch.device("cuda"), fake.forward, 8192)
    assert budget.bytes_per_token == 256 * KIB
    assert budget.free_bytes == 20 * GIB
    assert (budget.tokens, budget.source) == (40960, "device memory")
    assert "256.0 KiB/token" in budget.describe() and "20.0 GiB free" in budget.describe()


def test_cuda_budget_on_a_large_card_is_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCuda(total=80 * GIB, resident=GIB, per_token=32 * KIB)
    fake.install(monkeypatch)
    budget = device_budget(torch.device("cuda"), fake.forward, 8192)
    assert (budget.tokens, budget.source) == (GPU_CAP, "cap")


def test_load_classifier_records_how_the_budget_was_chosen(tiny_model_dir: Path) -> None:
    auto = load_classifier(tiny_model_dir, device="cpu", max_tokens=512)
    assert auto.limits.max_batch_tokens == CPU_BUDGET
    assert auto.budget is not None and auto.budget.source == "cpu default"
    assert auto.info()["budget"] == f"{CPU_BUDGET} tokens (cpu default)"
    set_ = load_classifier(tiny_model_dir, device="cpu", max_tokens=512, max_batch_tokens=2048)
    assert (set_.limits.max_batch_tokens, set_.budget, set_.info()["budget"]) == (2048, None, "set")
