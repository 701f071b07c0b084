"""The engine's settings: validation naming the field, the compile rule, `load()` applying every setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.engine_settings import EngineSettings


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("attention", "flash", "must be auto, flash_attn, varlen, sdpa, triton or triton_local"),
        ("compile", "yes", "must be auto, on or off"),
        ("threads", 0, "must be a positive integer"),
        ("max_batch_sequences", -4, "must be a positive integer"),
        ("max_text_chars", True, "must be a positive integer"),
        ("graph_tokens", 128, "must be an integer >= 256"),
        ("fused_gemm", "yes", "must be auto, on or off"),
        ("device", "tpu", "must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("device", "cuda:x", "must be auto, cpu, cuda or cuda:N"),
        ("device", "CPU", "must be auto, cpu, cuda or cuda:N"),
        ("dtype", "float8", r"must be float32, bfloat16 or float16 \(or fp32, bf16, fp16\), got 'float8'"),
    ],
)
def test_bad_values_are_refused_naming_the_field(field: str, value: object, why: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: {why}"):
        EngineSettings(**{field: value})


def test_the_devices_and_dtypes_accepted_are_the_runners() -> None:
    from model.engine_settings import DTYPES
    from model.runner import DTYPES as RUNNER_DTYPES

    assert set(DTYPES) == set(RUNNER_DTYPES)
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert EngineSettings(device=device).device == device
    for dtype in (None, *DTYPES):
        assert EngineSettings(dtype=dtype).dtype == dtype


def test_the_graph_bucket_floor_is_the_engines() -> None:
    from model.engine_settings import SMALLEST_GRAPH
    from model.graphs import SMALLEST

    assert SMALLEST_GRAPH == SMALLEST
    assert EngineSettings(graph_tokens=SMALLEST).graph_tokens == SMALLEST


def test_compile_auto_means_cuda_only() -> None:
    def wants(compile: str, device: str, cuda: bool = False) -> bool:
        return EngineSettings(compile=compile, device=device).wants_compile(cuda_available=cuda)

    assert not wants("auto", "cpu") and not wants("auto", "cpu", cuda=True)
    assert wants("auto", "cuda") and wants("auto", "cuda:1")
    assert wants("auto", "auto", cuda=True) and not wants("auto", "auto", cuda=False)
    assert wants("on", "cpu") and not wants("off", "cuda")


def test_load_applies_every_engine_setting(tiny_model_dir: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        s = EngineSettings(model=str(tiny_model_dir), device="cpu", threads=1, attention="sdpa",
                           compile="off", max_batch_tokens=2048, max_batch_sequences=7)  # fmt: skip
        clf = s.load()
        assert torch.get_num_threads() == 1
        assert (clf.device, clf.backend, clf.runner.compiled) == ("cpu", "sdpa", False)
        assert (clf.limits.max_batch_tokens, clf.limits.max_batch_sequences) == (2048, 7)
        assert clf.path == str(tiny_model_dir)
    finally:
        torch.set_num_threads(before)


def test_on_cuda_follows_the_device_setting() -> None:
    assert EngineSettings(device="cuda").on_cuda() and EngineSettings(device="cuda:1").on_cuda(False)
    assert not EngineSettings(device="cpu").on_cuda(True)
    assert EngineSettings(device="auto").on_cuda(True) and not EngineSettings(device="auto").on_cuda(False)
