"""Shared by the Triton kernel tests: the CUDA path's autotuners, run on the CPU in Triton's interpreter."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


def run_once(kernel_call: Callable[[], Any], quantiles: Any = None) -> list[float]:
    """A `do_bench` for the interpreter, where nothing can be timed: run the config once, report 1 ms."""
    kernel_call()
    return [1.0, 1.0, 1.0]


@contextlib.contextmanager
def autotuners_on_cpu(use: Callable[[Any], None], build: Callable[..., Any]) -> Iterator[None]:
    """Route CPU calls through `build(do_bench=run_once)` (real `triton.autotune` objects: grid lambdas,
    keys, pruning, every config run once) while inside; a no-op on CUDA, which always autotunes."""
    if torch.cuda.is_available():
        yield
        return
    use(build(do_bench=run_once))
    try:
        yield
    finally:
        use(None)
