"""CPU threads for torch: as many as the process may really use, not as many as the host has.

Owns: reading the CPU limit of this process — its affinity mask and a cgroup CPU quota (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`), which is what a Kubernetes CPU limit becomes — and setting torch's
intra-op threads from it (`safety serve`'s default tokenizer threads follow it too). `os.cpu_count()` reports
the node's cores: a pod limited to 4 CPUs on a 64-core node would otherwise run 64 threads and be throttled.
Also names OS threads after their Python threads (`name_os_thread`), so each thread's CPU time can be read
from outside.
Must not know: gRPC, Celery, the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
PR_SET_NAME = 15  # prctl(2): set the calling thread's name


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup CPU quota, or None when there is no quota (or no cgroup filesystem)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cpu_limit(affinity: int, quota: float | None) -> int:
    """CPUs a process may use: min(`affinity`, the CPUs in its affinity mask, and `quota`, the cgroup CPU
    quota in CPUs (None: none), rounded up), at least 1."""
    cpus = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, cpus)


def available_cpus(root: Path = CGROUP) -> int:
    """`cpu_limit` of this process: its affinity mask and the cgroup quota under `root`."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    return cpu_limit(affinity, cgroup_quota(root))


def configure_threads(
    threads: int | None = None, environ: dict[str, str] | None = None, accelerator: bool = False
) -> int:
    """Set torch's intra-op threads to `threads`; unset: OMP_NUM_THREADS when the environment sets it (an
    operator's or Kubernetes' choice, e.g. from `resourceFieldRef: limits.cpu`), else `available_cpus()` —
    or 1 when the model runs on an `accelerator`: torch's CPU work there is a few small host ops per batch,
    and a team of intra-op threads only competes with the tokenizer (on an H200's 16-core host the runner
    thread's team showed as 7 threads at ~24% of a core each through the gRPC benchmark). Returns the
    number set."""
    import torch

    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "").strip()
    default = 1 if accelerator else available_cpus()
    n = threads or (int(omp) if omp.isdigit() and int(omp) > 0 else None) or default
    if n < 1:
        raise ValueError(f"threads: must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread its Python name (or `name`) in the OS too, truncated to 15 bytes: Linux shows
    it in /proc/PID/task/TID/comm, `top -H` and profilers, so per-thread CPU time can be read off a running
    server (bench/e2e.py does). Threads it starts afterwards (the tokenizer's Rust pool, torch's intra-op
    pool) inherit the name. Does nothing where the OS call is unavailable."""
    if not sys.platform.startswith("linux"):
        return
    label = (name or threading.current_thread().name).encode()[:15]
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(label), 0, 0, 0)
