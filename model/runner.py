"""The runner: owns the device, the dtype, the attention backend and the network in inference mode.

Owns: packed batch (list of token-id lists) -> logits, on the chosen device, with host-side metadata (lengths,
`max_seqlen`) so no device->host sync happens inside a batch; pinned host buffers and non-blocking copies on
CUDA, on a copy stream of their own so the next batch's transfer overlaps the current batch's compute (the
compute stream waits for it on the device, never the host); `run` keeps one batch queued ahead so host-side
packing overlaps device compute, and each batch's logits are copied back right behind its own forward, so
waiting for one batch never waits for the next; small batches replay a CUDA graph (model/graphs.py) when
graphs are on; each batch's device time (CUDA events around its forward), summed in `device_seconds`.
Must not know: tokenization, windows, thresholds, queues, gRPC or Celery.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from model import fused, triton_attention
from model.attention import TRITON, VARLEN, Attention, fastest_backend, pick_backend
from model.budget import probe_shape
from model.errors import InvalidInputError, UnsupportedError
from model.graphs import LARGEST, SMALLEST, GraphSet, GraphShape, graph_shapes
from model.modernbert import ModernBertForSequenceClassification
from model.packing import Packed, pack

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidInputError(
            f"unsupported device {device!r}; use auto, cpu or cuda[:N]", field="device"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():  # this machine, not the setting: no traceback
        raise UnsupportedError(f"device: {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"unsupported device {device!r}; use auto, cpu or cuda[:N]", field="device")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 by default on CUDA; fp16 selectable."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}", field="dtype")
    return DTYPES[dtype]


def compiles_first_on_a_large_batch(device: torch.device) -> bool:
    """Does a compiled runner on `device` compile on a full-size batch at load (`Runner.
    _first_compile_on_a_large_batch`)? CUDA only: inductor's block sizes follow the first shapes it sees
    there. A function of its own so a CPU test can take this CUDA-only path (tests/model/test_runner.py)."""
    return device.type == "cuda"


def measured_card(device: torch.device) -> bool:
    """Is `device` a CUDA card of the generation our Triton kernels were measured faster on (Hopper, compute
    capability 9.x: H100, H200)? What `auto` turns them on for; elsewhere they stay off unless asked for."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` as the calling thread's current CUDA device (Triton launches there, and events record on its
    stream): a runner on cuda:1 may launch from a thread whose current device is cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def can_graph(device: torch.device, backend: str) -> bool:
    """Can a runner on `device` with attention `backend` capture CUDA graphs (model/graphs.py)? A function
    of its own so a CPU test can take the capture and replay paths with a stand-in GraphSet."""
    return device.type == "cuda" and backend in VARLEN


@dataclass(eq=False)
class Launched:
    """A batch queued on the device: its logits (maybe still being computed) and what times its forward."""

    logits: torch.Tensor
    start: torch.cuda.Event | None  # CUDA: recorded on the compute stream around the forward
    end: torch.cuda.Event | None
    seconds: float = 0.0  # CPU: the forward's wall time (it ran in `launch`); CUDA: the events', read once
    graphed: bool = False  # replayed a CUDA graph
    host: torch.Tensor | None = None  # CUDA: fp32 logits in pinned memory, copied right behind the forward
    copied: torch.cuda.Event | None = None  # CUDA: recorded after that copy; `collect` waits for it alone

    def device_seconds(self) -> float:
        """Device time of the forward: the CUDA events' elapsed time (once `collect` has waited for the batch,
        so reading them costs no extra sync; on a busy stream the start fires when the previous batch ends,
        so consecutive batches never count the same time twice), the forward's wall time on the CPU."""
        if self.start is not None and self.end is not None:  # read once, then kept
            self.seconds = self.start.elapsed_time(self.end) / 1e3
            self.start = self.end = None
        return self.seconds


def _record(device: torch.device) -> torch.cuda.Event | None:
    """A timing event recorded now on the device's current stream (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class Runner:
    def __init__(
        self,
        net: ModernBertForSequenceClassification,
        device: torch.device,
        dtype: torch.dtype,
        backend: str | None = None,
        compile: bool | str = False,
        copy_stream: bool = True,
        graphs: bool | None = False,
        graph_tokens: int | None = None,
        fused_gemm: bool | None = False,
    ) -> None:
        """`graphs`: capture CUDA graphs for batches under `graph_tokens` tokens (None: model.graphs.LARGEST).
        `graphs` None: on when the device is CUDA and the kernel is a varlen one; True refuses a setup that
        cannot have them. A capture that fails on this device leaves graphs off, with the reason in
        `graph_error`. `fused_gemm`: Wqkv + RoPE and Wi + GeGLU as fused Triton GEMMs (model/fused.py;
        CUDA with bf16 or fp16, or Triton's interpreter); None (auto): on where they can run on a CUDA card of
        the generation they were measured on (`measured_card`). `backend` "auto": `fastest_backend` given
        that choice (our Triton kernel on the local layers only beside the fused GEMMs, as measured); None:
        `pick_backend`'s flash or SDPA kernel."""
        self.device = device
        self.dtype = dtype
        c = net.config
        head_dim = c.head_dim
        why = fused.unsupported(
            device, dtype, c.hidden_activation, c.hidden_size, c.num_attention_heads, c.intermediate_size
        )
        if fused_gemm is None:  # auto: measured faster than cuBLAS + compiled elementwise on an H200
            fused_gemm = why is None and measured_card(device)
        if backend == "auto":
            self.backend = fastest_backend(device, dtype, head_dim, fused_gemm)
        else:
            self.backend = pick_backend(device, backend)
        if self.backend in VARLEN and dtype == torch.float32 and device.type == "cuda":
            raise InvalidInputError(
                f"backend {self.backend!r} needs bfloat16 or float16, not float32", field="dtype"
            )
        if self.backend in TRITON and not triton_attention.tileable(head_dim):
            raise InvalidInputError(
                f"{self.backend!r} needs a power-of-two head_dim, at least 16, got {head_dim}",
                field="backend",
            )
        self.net = net.to(device=device, dtype=dtype).eval()
        self.net.model.reset_rope(device)
        self.fused_gemm = fused_gemm
        if fused_gemm:
            if why:
                raise InvalidInputError(f"{why}", field="fused_gemm")
            self.net.fuse_epilogues()
        self.attn = Attention(self.backend, net.config.window)
        self._lock = threading.Lock()  # one batch on the device at a time
        use_stream = copy_stream and device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if use_stream else None
        self.compiled = bool(compile)
        self.device_seconds = 0.0  # device time of every batch collected so far (utilization = its rate)
        self.launches = self.replays = 0  # batches launched, and how many of them replayed a CUDA graph
        # everything `launch` reads is set before the first forward below (the first compile runs one)
        self.graphs: GraphSet | None = None
        self.graph_error: str | None = None
        self.timings: dict[str, float] = {}  # seconds of the load's stages (compile_s, graph_capture_s)
        if compile:
            self._compile(None if compile is True else compile)
            if compiles_first_on_a_large_batch(device):
                t0 = time.perf_counter()
                self._first_compile_on_a_large_batch()
                self.timings["compile_s"] = time.perf_counter() - t0
        graphable = can_graph(device, self.backend)
        if graphs and not graphable:
            raise InvalidInputError(
                f"CUDA graphs need a CUDA device and a varlen attention kernel, got {device} "
                f"with {self.backend!r}",
                field="cuda_graphs",
            )
        if graphs or (graphs is None and graphable):
            self.capture_graphs(
                graph_shapes(net.config.max_position_embeddings, largest=graph_tokens or LARGEST)
            )

    @torch.inference_mode()
    def capture_graphs(self, shapes: list[GraphShape]) -> bool:
        """Capture CUDA graphs for `shapes` (a compiled CUDA runner has already compiled on a large batch),
        replacing any captured before. False, with `graph_error` set, when there are no shapes or this device
        cannot capture them: the runner stays ungraphed."""
        self.graphs = None
        if not shapes:
            self.graph_error = (
                f"no graph buckets (graph_tokens is below the smallest bucket, {SMALLEST} tokens)"
            )
            return False
        graphs = GraphSet(lambda batch: self.net(batch, self.attn), shapes, self.device)
        t0 = time.perf_counter()
        try:
            with _on(self.device):
                graphs.capture()
        except Exception as e:  # a kernel this device cannot capture: run ungraphed, say why
            self.graph_error = f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            return False
        finally:
            self.timings["graph_capture_s"] = time.perf_counter() - t0
        self.graphs, self.graph_error = graphs, None
        return True

    def _first_compile_on_a_large_batch(self) -> None:
        """Compile now, on a full-size batch (the longest sequences, ~32k tokens), before the graph buckets
        or the budget probe run anything. Inductor picks its Triton kernels' block sizes from the shapes of
        the first call it compiles, even with dynamic shapes: on an H100, compiling first on the 256-token
        graph bucket made the RoPE kernel 57% slower per call (231 -> 362 us) and brought LayerNorm into the
        top kernels (155 us) on the 131k-token batches that carry the throughput (docs/benchmarks.md)."""
        length, count = probe_shape(self.net.config.max_position_embeddings)
        self.forward([[0] * length] * count)

    def _compile(self, mode: str | None) -> None:
        """`torch.compile(dynamic=True)` of the attention-free regions (embeddings, qkv + RoPE, output +
        MLP, head); attention stays an eager kernel call. Eager and compiled give the same results.
        `mode`: torch.compile's (None: default; "max-autotune-no-cudagraphs" tries GEMM templates with
        fused epilogues, at a much longer compile)."""
        net = self.net
        opts = dict(dynamic=True, mode=mode)
        net.model.embeddings.forward = torch.compile(net.model.embeddings.forward, **opts)
        for layer in net.model.layers:
            layer.qkv = torch.compile(layer.qkv, **opts)
            layer.residual = torch.compile(layer.residual, **opts)
        net.head.forward = torch.compile(net.head.forward, **opts)

    @torch.inference_mode()
    def launch(self, sequences: list[list[int]], graphs: bool = True) -> Launched:
        """Pack on the host and queue the batch on the device; returns without waiting for it (on CUDA the
        kernels run asynchronously, so the caller can pack and queue the next batch before `collect` waits
        for this one). CPU: computed when this returns. `graphs` False: launched kernel by kernel even where
        a CUDA graph would take it (warm-ups)."""
        batch = self._check(pack(sequences))
        prepared = self.graphs.prepare(batch) if graphs and self.graphs is not None else None
        self.launches += 1
        if prepared is not None:
            with self._lock, _on(self.device):
                self.replays += 1
                start = _record(self.device)
                logits = GraphSet.replay(prepared)
                return self._read_back(Launched(logits, start, _record(self.device), graphed=True))
        cuda = self.device.type == "cuda"
        pinned = batch.pin_memory() if cuda else None
        with self._lock, _on(self.device):
            if pinned is not None:
                batch = self._to_device(pinned)
            start, t0 = _record(self.device), time.perf_counter()
            logits = self.net(batch, self.attn)
            return self._read_back(Launched(logits, start, _record(self.device), time.perf_counter() - t0))

    @staticmethod
    def _read_back(launched: Launched) -> Launched:
        """CUDA: queue the logits' copy to pinned host memory now, right behind this batch's forward on the
        stream, with an event after it. A copy queued in `collect` instead would sit behind every batch
        launched since (the stream runs in order): with one batch queued ahead, waiting for batch i meant
        waiting for batch i+1 as well, and the device idled while the host launched i+2 (H200: 86% busy on
        traffic with ~13 ms ungraphed launches, docs/benchmarks.md)."""
        if launched.start is None:  # CPU: the forward already ran
            return launched
        logits = launched.logits
        launched.host = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
        launched.host.copy_(logits.float(), non_blocking=True)
        launched.copied = torch.cuda.Event()
        launched.copied.record(torch.cuda.current_stream(logits.device))  # the logits' GPU, not GPU 0
        return launched

    def _check(self, batch: Packed) -> Packed:
        """`batch`, if the network can take it (on the host, before anything is queued): every sequence within
        max_position_embeddings, every id in the vocabulary; else an InvalidInputError naming the sequence
        (`encode` makes only such sequences; a caller of `forward` with its own ids may not)."""
        config = self.net.config
        if batch.max_seqlen > (limit := config.max_position_embeddings):
            i = batch.lengths.index(batch.max_seqlen)
            why = f"has {batch.max_seqlen} tokens, more than max_position_embeddings {limit}"
            raise InvalidInputError(why, field=f"sequences[{i}]")
        ids = batch.input_ids.numpy()  # numpy, not torch: no intra-op thread team woken for a host check
        bad = (ids < 0) | (ids >= config.vocab_size)
        if bad.any():
            at = int(bad.argmax())
            i = int(batch.seq_index[at])
            where = f"sequences[{i}][{at - int(batch.cu_seqlens[i])}]"
            raise InvalidInputError(
                f"token id {int(ids[at])} is not in the vocabulary [0, {config.vocab_size})", field=where
            )
        return batch

    def _to_device(self, pinned: Packed) -> Packed:
        """Non-blocking host->device copy; on the copy stream when there is one, with the compute stream
        waiting for it on the device (an event, no host sync) and the allocator told where the copies are
        used, so their memory is not handed out again before the compute that reads them is done."""
        if self._copy_stream is None:
            return pinned.to(self.device, non_blocking=True)
        with torch.cuda.stream(self._copy_stream):
            batch = pinned.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()  # on the copy stream
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        for t in batch.tensors():
            t.record_stream(compute)
        return batch

    def collect(self, launched: Launched) -> torch.Tensor:
        """Wait for a launched batch: fp32 logits (n, num_labels) on the CPU (and add its device time to
        `device_seconds`)."""
        if launched.copied is not None:
            launched.copied.synchronize()  # this batch and its copy, not the batches queued behind it
            logits = launched.host
        else:
            logits = launched.logits.float().cpu()
        self.device_seconds += launched.device_seconds()
        return logits

    def forward(self, sequences: list[list[int]], graphs: bool = True) -> torch.Tensor:
        """Token-id lists (specials included) -> fp32 logits (n, num_labels) on the CPU."""
        return self.collect(self.launch(sequences, graphs))

    def run(self, batches: Iterable[list[list[int]]]) -> Iterator[torch.Tensor]:
        """Logits per batch, in order, with one batch queued ahead: batch i+1 is packed, copied and queued
        on the device before the host waits for batch i, so the device never idles between batches."""
        pending: Launched | None = None
        for sequences in batches:
            launched = self.launch(sequences)
            if pending is not None:
                yield self.collect(pending)
            pending = launched
        if pending is not None:
            yield self.collect(pending)
