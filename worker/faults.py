"""A test-only fault hook: make chosen chunks crash, raise or hang inside a real worker process.

Owns: parsing `SAFETY_TEST_FAULT` = "JOB:CHUNK:ACTION[,JOB:CHUNK:ACTION...]" (CHUNK may be `*`) with ACTION
`exit` (the process dies at once, as under an OOM kill), `raise` (the classifier raises RuntimeError),
`device` (a RuntimeError worded as a sticky CUDA error, which breaks the device for good), `hang` (once per
chunk: touch `$SAFETY_TEST_FAULT_DIR/JOB.CHUNK.hang`, then block while that file exists, so a test knows the
worker is mid-chunk and can kill it or restart Redis; a redelivery does not hang again) or `slow` (sleep
`$SAFETY_TEST_FAULT_SLOW_S` seconds, 1 by default). The task calls `inject` before each slice of the chunk
(`worker.slices`): the first slice exits, raises or hangs; every slice is slow.
Unset in production: `inject` does nothing. Must not know: Celery, Redis, the model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "SAFETY_TEST_FAULT"
DIR_ENV = "SAFETY_TEST_FAULT_DIR"
SLOW_ENV = "SAFETY_TEST_FAULT_SLOW_S"
ACTIONS = ("exit", "raise", "hang", "device", "slow")


def _faults(spec: str) -> dict[tuple[str, str], str]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        job_id, chunk, action = part.rsplit(":", 2)
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown action {action!r} in {part!r}; actions are {ACTIONS}")
        out[(job_id, chunk)] = action
    return out


def inject(job_id: str, chunk: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    faults = _faults(spec)
    action = faults.get((job_id, str(chunk))) or faults.get((job_id, "*"))
    if action == "exit":
        os._exit(70)
    if action == "raise":
        raise RuntimeError(f"injected fault ({ENV}) in chunk {chunk} of job {job_id}")
    if action == "device":  # what a sticky CUDA error looks like (model.runner.device_failed)
        raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected by {ENV})")
    if action == "slow":
        time.sleep(float(os.environ.get(SLOW_ENV) or 1.0))
    if action == "hang":
        directory = Path(os.environ.get(DIR_ENV, "."))
        once, marker = directory / f"{job_id}.{chunk}.hung", directory / f"{job_id}.{chunk}.hang"
        if once.exists():
            return
        once.touch()
        marker.touch()
        while marker.exists():
            time.sleep(0.05)
