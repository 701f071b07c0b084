"""The engine's settings, shared by `safety serve` and `safety worker`: which checkpoint, where, and how.

Owns: the `SAFETY_*` variables that choose and shape the classifier (model, device, dtype, CPU threads,
attention kernel, torch.compile, CUDA graphs and their largest bucket, fused GEMM kernels, batch token and
sequence budgets, the character limit of a text), their defaults, their validation (`device_problem` and
`dtype_problem` also check the command-line flags of the same name), and `load()`, which turns them into a
`Classifier` (threads set first, compile decided from the device; a checkpoint it cannot load is named by
its setting, `named()`). `ServeSettings` and `WorkerSettings` extend this dataclass, so the two front ends
read the same variables the same way. Must not know: gRPC, Celery, Redis, the error type a front end raises
(a subclass gives `bad()`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.errors import CheckpointError, ModelNotFoundError
from model.settings_base import env_name, opt_int, opt_str, setting

if TYPE_CHECKING:
    from model.classifier import Classifier

ATTENTION = ("auto", "flash_attn", "varlen", "sdpa", "triton", "triton_local")
# SAFETY_COMPILE, SAFETY_CUDA_GRAPHS, SAFETY_FUSED_GEMM: each word and what the engine is given for it (auto:
# None, the engine decides for its device)
AUTO_ON_OFF: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # what model.runner.resolve_device accepts
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # model.runner.DTYPES, without torch
SMALLEST_GRAPH = 256  # model.graphs.SMALLEST, restated so that reading settings does not import torch


def device_problem(device: str) -> str | None:
    """What is wrong with a device name (None: nothing), in the words every front end uses: the settings
    here and the `--device` flag of `safety classify`, `eval` and `train` (model/cliargs.py)."""
    if DEVICE.fullmatch(device):
        return None
    return f"must be auto, cpu, cuda or cuda:N, got {device!r}"


def dtype_problem(dtype: str) -> str | None:
    """What is wrong with a dtype name (None: nothing); as `device_problem`."""
    if dtype in DTYPES:
        return None
    return f"must be float32, bfloat16 or float16 (or fp32, bf16, fp16), got {dtype!r}"


@dataclass(frozen=True)
class EngineSettings:
    model: str | None = setting(
        None,
        "SAFETY_MODEL",
        opt_str,
        "checkpoint directory (config.json, model.safetensors, tokenizer.json); "
        "unset: the bundled default model",
    )
    device: str = setting("auto", "SAFETY_DEVICE", str, "auto | cpu | cuda | cuda:N")
    dtype: str | None = setting(
        None,
        "SAFETY_DTYPE",
        opt_str,
        "float32 | bfloat16 | float16, or fp32 | bf16 | fp16 (unset: float32 on CPU, bfloat16 on CUDA)",
    )
    threads: int | None = setting(
        None,
        "SAFETY_THREADS",
        opt_int,
        "torch CPU threads per process (unset: OMP_NUM_THREADS if set, else 1 when the model runs on CUDA, "
        "else the CPUs this process may use: its affinity mask and cgroup CPU quota, i.e. a Kubernetes CPU "
        "limit, not the node's core count)",
    )
    attention: str = setting(
        "auto",
        "SAFETY_ATTENTION",
        str,
        "attention kernel: auto (CUDA: flash-attn on every layer if installed, else triton_local beside the "
        "fused GEMMs with bf16/fp16, else varlen; SDPA on CPU) | flash_attn | varlen (torch's flash kernel) "
        "| sdpa | triton (our stream-tiled varlen kernel, CUDA) | triton_local (that kernel on the local "
        "layers, flash on the global ones: with the fused GEMMs the fastest on an H200, docs/benchmarks.md)",
    )
    compile: str = setting(
        "auto",
        "SAFETY_COMPILE",
        str,
        "torch.compile the network when the model loads and warm every bucket shape before the first "
        "request or chunk: auto (on for CUDA, off on CPU, where it measured no gain) | on | off",
    )
    cuda_graphs: str = setting(
        "auto",
        "SAFETY_CUDA_GRAPHS",
        str,
        "replay CUDA graphs for batches under SAFETY_GRAPH_TOKENS tokens, captured when the model loads: "
        "auto (on for CUDA with a varlen attention kernel) | on | off",
    )
    graph_tokens: int | None = setting(
        None,
        "SAFETY_GRAPH_TOKENS",
        opt_int,
        f"tokens in the largest CUDA graph bucket, at least {SMALLEST_GRAPH} (unset: 16384): batches under "
        "it replay a graph; fewer means fewer buckets, a shorter capture and a smaller graph memory pool",
    )
    fused_gemm: str = setting(
        "auto",
        "SAFETY_FUSED_GEMM",
        str,
        "Wqkv + RoPE and Wi + GeGLU as Triton GEMMs with the elementwise work fused into them (CUDA, bf16 or "
        "fp16; needs triton, which CUDA builds of torch bring): auto (on for Hopper cards, compute "
        "capability 9.x, where they can run: 1.03-1.18x cuBLAS + torch.compile's kernels on an H200, "
        "docs/benchmarks.md) | on | off",
    )
    max_batch_tokens: int | None = setting(
        None,
        "SAFETY_MAX_BATCH_TOKENS",
        opt_int,
        "token budget of one batch (unset: 16384 on CPU; on CUDA sized to the free device memory by a probe "
        "batch at start-up, at most 131072)",
    )
    max_batch_sequences: int | None = setting(
        None,
        "SAFETY_MAX_BATCH_SEQUENCES",
        opt_int,
        "sequences (windows) per batch (unset: 256 on CPU, 2048 on CUDA)",
    )
    max_text_chars: int = setting(
        200_000,
        "SAFETY_MAX_TEXT_CHARS",
        int,
        "characters per text (and per context); a longer one is refused, naming the item and the limit",
    )

    @classmethod
    def named(cls, name: str) -> str:
        """How a message names setting `name` once the settings are made: its variable (a front end with
        flags names both)."""
        return env_name(cls, name)

    @staticmethod
    def bad(name: str, message: str) -> Exception:
        """The error a front end raises for setting `name` (a subclass names the variable its own way)."""
        return ValueError(f"{name}: {message}")

    def __post_init__(self) -> None:
        for name, message in self.engine_problems():
            raise self.bad(name, message)

    def engine_problems(self) -> Iterator[tuple[str, str]]:
        """(field, message) for each engine setting out of range; the front ends check their own after."""
        for name in ("threads", "max_batch_tokens", "max_batch_sequences", "max_text_chars"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                yield name, f"must be a positive integer, got {value!r}"
        tokens = self.graph_tokens
        if tokens is not None and (isinstance(tokens, bool) or tokens < SMALLEST_GRAPH):
            yield "graph_tokens", f"must be an integer >= {SMALLEST_GRAPH}, got {tokens!r}"
        if self.attention not in ATTENTION:
            names = f"{', '.join(ATTENTION[:-1])} or {ATTENTION[-1]}"
            yield "attention", f"must be {names}, got {self.attention!r}"
        for name in ("compile", "cuda_graphs", "fused_gemm"):
            if getattr(self, name) not in AUTO_ON_OFF:
                yield name, f"must be auto, on or off, got {getattr(self, name)!r}"
        if why := device_problem(self.device):
            yield "device", why
        if self.dtype is not None and (why := dtype_problem(self.dtype)):
            yield "dtype", why

    def wants_compile(self, cuda_available: bool | None = None) -> bool:
        """SAFETY_COMPILE: auto compiles on CUDA only (on CPU, compiled and eager measured the same speed)."""
        if self.compile != "auto":
            return self.compile == "on"
        return self.on_cuda(cuda_available)

    def on_cuda(self, cuda_available: bool | None = None) -> bool:
        """Will the model run on CUDA (SAFETY_DEVICE cuda[:N], or auto on a host with CUDA)?"""
        if self.device.startswith("cuda"):
            return True
        if self.device != "auto":
            return False
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        return cuda_available

    def load(self) -> Classifier:
        """Set torch's CPU threads, then load the classifier these settings describe (compiled or not; a
        compiled one still needs `Classifier.warmup()` before its first batch pays no compile)."""
        from model.classifier import load_classifier
        from model.threads import configure_threads

        configure_threads(self.threads, accelerator=self.on_cuda())
        try:
            return load_classifier(
                self.model,
                device=self.device,
                dtype=self.dtype,
                max_batch_tokens=self.max_batch_tokens,
                max_batch_sequences=self.max_batch_sequences,
                backend=self.attention,  # "auto": model.attention.fastest_backend
                compile=self.wants_compile(),
                graphs=AUTO_ON_OFF[self.cuda_graphs],
                graph_tokens=self.graph_tokens,
                fused_gemm=AUTO_ON_OFF[self.fused_gemm],
            )
        except CheckpointError as e:  # the path a setting gave: say which ("/nope: not a directory" did not)
            if self.model is None or isinstance(e, ModelNotFoundError):
                raise
            raise CheckpointError(f"{self.named('model')}: {e}") from None
