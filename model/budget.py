"""Token budget of one batch, sized to the device it runs on.

Owns: how many tokens one packed batch may hold. On CUDA the budget comes from the device's free memory:
a probe batch measures the activation bytes per token (peak allocated minus the loaded baseline; the
unpadded forward is linear in tokens), and the budget is the largest aligned token count whose activations
fit a fraction of the free memory, clamped to [longest window, cap]. On the CPU memory is not what binds
(a full 16k budget peaks at a few hundred MiB; cache locality and latency are), so the budget is fixed.
`fit_budget` is pure arithmetic; `measure_bytes_per_token` is the one device probe. Must not know:
tokenizers, windows, queues, gRPC, Celery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CPU_BUDGET = 16384  # tokens: fast enough per batch for interactive latency on a few cores
GPU_CAP = 131072  # tokens: the pack size of gpu-anchor.md's prototype; bench/gpu.py sweeps budgets around it
MEMORY_FRACTION = 0.5  # of the free device memory after loading: room for a second batch in flight
ALIGN = 1024


@dataclass(frozen=True)
class Budget:
    tokens: int
    source: str  # "cpu default", or what bound the CUDA budget: "device memory" | "cap" | "floor"
    bytes_per_token: float | None = None  # measured activation bytes per token (CUDA probe)
    free_bytes: int | None = None  # free device memory when it was measured

    def describe(self) -> str:
        if self.bytes_per_token is None or self.free_bytes is None:
            return f"{self.tokens} tokens ({self.source})"
        return (
            f"{self.tokens} tokens ({self.source}: {self.bytes_per_token / 1024:.1f} KiB/token measured, "
            f"{self.free_bytes / 2**30:.1f} GiB free)"
        )


def fit_budget(
    free_bytes: int,
    bytes_per_token: float,
    *,
    floor: int,
    cap: int = GPU_CAP,
    fraction: float = MEMORY_FRACTION,
    align: int = ALIGN,
) -> tuple[int, str]:
    """Largest multiple of `align` tokens whose activations fit `fraction` of `free_bytes`, within
    [floor, cap]; returns (tokens, what bound it: "device memory" | "cap" | "floor")."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    if floor > cap:
        raise ValueError(f"floor ({floor}) must not exceed cap ({cap})")
    fits = int(fraction * free_bytes / bytes_per_token) // align * align
    if fits >= cap:
        return cap, "cap"
    if fits <= floor:
        return floor, "floor"
    return fits, "device memory"


def probe_shape(max_tokens: int, probe_tokens: int = 32768) -> tuple[int, int]:
    """(length, count) of the probe batch: the longest window, as many as make about `probe_tokens`."""
    return max_tokens, max(1, probe_tokens // max_tokens)


def measure_bytes_per_token(
    forward: Callable[[list[list[int]]], object], length: int, count: int, device: torch.device | None = None
) -> float:
    """Peak CUDA memory a forward of `count` sequences of `length` tokens allocates above what was already
    allocated, per token, on `device` (None: the current one; a runner on cuda:N names it, or GPU 0's
    counters would be read). `forward` must run there and finish before returning."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    forward([[1] * length] * count)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / (length * count)


def device_budget(
    device: torch.device,
    forward: Callable[[list[list[int]]], object],
    max_tokens: int,
    cap: int = GPU_CAP,
) -> Budget:
    """The batch token budget for `device`: fixed on the CPU, probed from free memory on CUDA."""
    if device.type != "cuda":
        return Budget(max(CPU_BUDGET, max_tokens), "cpu default")
    per_token = measure_bytes_per_token(forward, *probe_shape(max_tokens), device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    tokens, bound = fit_budget(free, per_token, floor=max_tokens, cap=max(cap, max_tokens))
    return Budget(tokens, bound, per_token, free)
