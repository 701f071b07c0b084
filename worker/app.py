"""The Celery app: JSON only, late acks, one visibility timeout, a dedicated queue.

Owns: `create_app(settings)` and the Celery configuration that makes a chunk survive a dead worker:
`task_acks_late` + `task_reject_on_worker_lost` (a killed pool process requeues its chunk; the attempt counter
in `worker.store` bounds the loop), prefetch multiplier 1, one visibility timeout for the broker and the
result backend, and a fast enough sweep of unacknowledged messages to honour it. `app` (module attribute)
is built lazily from the environment for `celery -A worker.app` and `safety worker`; the job client builds
its own with `create_app`. Must not know: torch, the model (the task module loads it in worker processes).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Producer

from worker.settings import WorkerSettings

TASK_NAME = "worker.tasks.classify_chunk"


def create_app(settings: WorkerSettings) -> Celery:
    vt = settings.visibility_timeout_s
    transport: dict[str, Any] = {
        "visibility_timeout": vt,
        # kombu sweeps unacked messages every interval x throttle seconds (100 s by default); sweep every
        # tenth of the visibility timeout (1-10 s) so a dead worker's chunk comes back on time.
        "unacked_restore_interval": max(1, min(10, vt // 10)),
        "unacked_restore_throttle": 1,
        # the lock around that sweep outlives a worker killed while holding it (kombu's default: 300 s, the
        # sweep frozen that long, e.g. after a Redis restart from its AOF); a sweep takes far less than this
        "unacked_mutex_expire": max(5, min(300, vt)),
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "socket_keepalive": True,
        "health_check_interval": 25,
    }
    app = Celery("safety", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # the task itself requeues what it could not finish
        task_ignore_result=True,  # results live in the job store, keyed by item index
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        worker_prefetch_multiplier=1,
        # With REMAP_SIGTERM=SIGQUIT (set by `safety worker` for the prefork pool), SIGTERM gives a running
        # chunk this long, then hands it back to the queue at once instead of leaving it to the visibility
        # timeout. The solo and threads pools keep the warm shutdown: the chunk in hand finishes.
        worker_soft_shutdown_timeout=settings.drain_grace_s,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        result_backend_transport_options=dict(transport),
        visibility_timeout=vt,
        result_expires=settings.result_ttl_s,
        task_publish_retry_policy={
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    return app


def chunk_task_id(job_id: str, chunk: int) -> str:
    """The Celery task id of a chunk's message: the lost-chunk sweeper finds messages by it."""
    return f"{job_id}.{chunk}"


def send_chunk(
    app: Celery,
    job_id: str,
    chunk: int,
    queue: str,
    producer: Producer | None = None,
    nonce: str | None = None,
) -> None:
    """Publish one chunk task (JSON, to the job's queue, retrying the publish on connection errors).

    Its args are `[job_id, chunk, nonce]`, the job record's nonce (`worker.store`), so that the worker tells
    this job from any other that had or will have its id; `[job_id, chunk]` for a record without a nonce
    (created by the previous release), as that release sent them. A worker of the previous release takes
    only two args (it fails a three-arg message, and acknowledges it): upgrade the workers before the
    submitters (docs/jobs.md)."""
    app.send_task(
        TASK_NAME,
        args=[job_id, chunk, nonce] if nonce else [job_id, chunk],
        task_id=chunk_task_id(job_id, chunk),
        queue=queue,
        producer=producer,
        retry=True,
        # results live in the job store: no result-channel SUBSCRIBE per chunk, and no UNSUBSCRIBE in the
        # AsyncResult's __del__, where a Ctrl-C during `safety submit` is swallowed ("Exception ignored")
        ignore_result=True,
    )


def __getattr__(name: str) -> Any:
    """`worker.app.app`: the worker's app, built on first use from the `SAFETY_*` environment."""
    if name == "app":
        global app
        app = create_app(WorkerSettings.from_env())
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
