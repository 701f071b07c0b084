"""model.errors.device_failed: which foreign errors mean the device is broken for good (checked on the CPU
with the exception types and messages torch raises on CUDA)."""

from __future__ import annotations

import pytest
import torch

from model.errors import device_failed


@pytest.mark.parametrize(
    ("exc", "fatal"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`"), True),
        (torch.AcceleratorError("CUDA error: uncorrectable ECC error encountered"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)"), False),
        (ValueError("CUDA error: not a RuntimeError"), False),
    ],
)
def test_device_failed_tells_a_broken_device_from_a_failed_batch(exc: BaseException, fatal: bool) -> None:
    assert device_failed(exc) is fatal
