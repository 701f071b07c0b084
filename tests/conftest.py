"""Shared fixtures: small random checkpoints written to disk once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton (model/fused.py's kernels) runs in its interpreter. Triton reads this when it is first
# imported, so it is set here, before any test module loads; subprocesses the tests start inherit it (so
# `bench/gpu.py --smoke` runs its fused-GEMM steps too). Nothing else here uses Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.checkpoints import SAFETY_LABELS, make_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-label 7-label ModernBERT (4 layers, hidden 64, local window 16) with a trained tokenizer."""
    return make_checkpoint(
        tmp_path_factory.mktemp("tiny_model"),
        labels=SAFETY_LABELS,
        thresholds={label: 0.5 for label in SAFETY_LABELS},
    )


@pytest.fixture(scope="session")
def tiny_classifier(tiny_model_dir: Path):
    from model import load_classifier

    return load_classifier(tiny_model_dir, device="cpu")
