"""A simulated GPU, to study the host side of the service at GPU rates on a machine without one.

The real classifier (tokenizer, windows, planner, scheduler, gRPC, protobuf) runs unchanged; only the runner's
network call is replaced by a device model: `launch` packs the batch on the host as the real runner does,
spends `launch_ms` of host time holding the GIL (what queueing an eager or compiled forward costs in Python),
and queues the batch on one FIFO "stream" that computes `tokens / rate` seconds per batch without using a
CPU; `collect` sleeps (GIL released) until the batch's end. Logits are random. What it shows: whether one
server process keeps a device of that speed busy, and which host thread gives out first. What it does not:
anything about the model or the GPU itself — the rate is an input (measured ones: docs/benchmarks.md,
H100 eager ~700k tokens/s, compiled ~1.16M on the traffic mix).

    python bench/simdevice.py serve --rate 1.16e6 --launch-ms 2 --address 127.0.0.1:50051 \\
        --metrics-address 127.0.0.1:9090                       # a `python -m service` on the simulated device
    python bench/e2e.py --simulate 1.16e6,2 ...                # engine and server on it (bench/e2e.py)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from model.packing import pack
from model.runner import Launched, Runner


@dataclass(eq=False)
class SimLaunched(Launched):
    ready_at: float = 0.0  # perf_counter time at which the simulated stream finishes this batch


class SimulatedRunner(Runner):
    """A `model.runner.Runner` whose `launch` / `collect` are the device model (its `forward` and one-ahead
    `run` are the real ones, built on those two; nothing of the parent's set-up runs: there is no network).
    Reports itself as a CUDA varlen runner so the scheduler keeps two batches in flight and prices batches
    unpadded, as on a GPU."""

    def __init__(self, labels: int, tokens_per_s: float, launch_ms: float = 0.0, seed: int = 0) -> None:
        # no super().__init__(): it would move a network onto a device
        if tokens_per_s <= 0 or launch_ms < 0:
            raise ValueError("--simulate: the rate must be positive and the launch time not negative")
        self.labels, self.rate, self.launch_s = labels, tokens_per_s, launch_ms / 1e3
        self.device = torch.device("cuda")  # a descriptor only: nothing here touches CUDA
        self.dtype = torch.bfloat16
        self.backend = "varlen"
        self.compiled = False
        self.fused_gemm = False
        self.graphs = None
        self.graph_error = None
        self.device_seconds = 0.0
        self._free_at = 0.0  # when the simulated stream finishes what is queued on it
        self._lock = threading.Lock()
        self._generator = torch.Generator().manual_seed(seed)

    def launch(self, sequences: list[list[int]]) -> SimLaunched:
        batch = pack(sequences)
        end = time.perf_counter() + self.launch_s
        while time.perf_counter() < end:  # host time to queue the kernels, holding the GIL as Python does
            pass
        with self._lock:
            compute = batch.num_tokens / self.rate
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + compute
            logits = torch.randn(batch.num_seqs, self.labels, generator=self._generator)
            return SimLaunched(logits, None, None, compute, ready_at=self._free_at)

    def collect(self, launched: SimLaunched) -> torch.Tensor:
        """Sleeps until this batch is done: the runner reads each batch back through an event queued right
        behind its forward (model/runner.py `_read_back`). SIM_STREAM_READBACK=1 models the runner before
        that: a read-back queued in `collect` on the compute stream, which also waits for every batch
        launched since (the one queued ahead)."""
        if os.environ.get("SIM_STREAM_READBACK") == "1":
            with self._lock:
                launched.ready_at = max(launched.ready_at, self._free_at)
        wait = launched.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self.device_seconds += launched.device_seconds()
        return launched.logits


def simulate(clf, spec: str):
    """Put a `SimulatedRunner` under `clf`: spec "RATE" or "RATE,LAUNCH_MS" (tokens/s, host ms per launch);
    the token budget becomes the H100's (131,072) unless the classifier's is larger."""
    from dataclasses import replace

    rate, _, launch_ms = spec.partition(",")
    clf.runner = SimulatedRunner(clf.config.num_labels, float(rate), float(launch_ms or 0.0))
    clf.limits = replace(clf.limits, max_batch_tokens=max(clf.limits.max_batch_tokens, 131072),
                         max_batch_sequences=2048)  # fmt: skip
    return clf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve on the simulated device")
    s.add_argument("--rate", type=float, required=True, help="device tokens/s")
    s.add_argument("--launch-ms", type=float, default=0.0, help="host ms per batch launch (GIL held)")
    s.add_argument("--model", default=None)
    s.add_argument("--address", default="127.0.0.1:50051")
    s.add_argument("--metrics-address", default="127.0.0.1:9090")
    s.add_argument("--log-level", default="WARNING")
    s.add_argument("--deadline-horizon-ms", type=float, default=10_000.0)
    args = ap.parse_args()

    from model import load_classifier
    from service.server import serve
    from service.settings import ServeSettings

    clf = simulate(load_classifier(args.model, device="cpu"), f"{args.rate},{args.launch_ms}")
    settings = ServeSettings(
        address=args.address,
        metrics_address=args.metrics_address,
        log_level=args.log_level,
        deadline_horizon_ms=args.deadline_horizon_ms,
    )
    raise SystemExit(asyncio.run(serve(settings, clf)))


if __name__ == "__main__":
    main()
