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


def specialization(kernel: Any, *args: Any, **constexprs: Any) -> list:
    """How Triton's CUDA backend (sm_90) specializes a launch of `kernel` with these arguments: one entry per
    argument, e.g. ('i32', 'D') for an integer divisible by 16, ('constexpr', 1) for a 1, ('i32', None) for
    one left unspecialized. Two launches whose entries differ compile the kernel twice. Computed on the host
    (no GPU needed) from the kernel's own `do_not_specialize`, also when Triton's interpreter has wrapped it;
    skips the test where this Triton has no such internals."""
    import pytest

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:  # Triton's internals move between releases
        pytest.skip(f"this Triton's specialization internals are not where expected: {e}")
    if not isinstance(kernel, JITFunction):  # the interpreter's wrapper keeps the decorator's arguments
        kernel = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"))
    backend = make_backend(GPUTarget("cuda", 90, 32))
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    return bind(*args, **constexprs)[1]
