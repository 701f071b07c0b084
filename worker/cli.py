"""`safety worker`, `safety submit`, `safety job status|results|cancel|delete|dead-letters`: the batch CLI.

Owns: the subcommands (registered through the `safety.commands` entry point `worker = "worker.cli:register"`),
reading a JSONL file of items (one at a time: `submit` hands them to the job client as a stream, never as a
list), the progress bar while waiting, riding out a Redis outage of up to REDIS_OUTAGE_S (within --timeout)
while it waits for a job or writes its results (then saying what to do next), writing result lines in item
order, exit
codes (0 done, 1 finished with failed items or cancelled, 2 an error, 130 interrupted, 141 the output's
reader went away), the choice of
Celery pool (solo per GPU on CUDA, prefork on CPU), and starting the metrics exporter (`worker.metrics`)
and the lost-chunk sweeper (`worker.reclaim`) in the worker's main process. Must not know: the model,
Redis keys; it drives `worker.jobs.JobClient` and starts the Celery worker of `worker.app`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from model.cliargs import EXIT_PIPE, count, positive_seconds, silence_stdout
from model.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidInputError,
    JobBusyError,
    SafetyError,
    UnavailableError,
)
from model.jsonl import jsonl_values
from model.logs import configure as configure_logs
from model.threads import available_cpus
from worker.settings import WorkerSettings, env_name

if TYPE_CHECKING:
    from worker.jobs import JobClient, Prepared

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
# While it waits for a job or streams its results, a command rides out Redis not answering for this long (a
# restart, a failover), retrying, before it gives up saying what to do next.
REDIS_OUTAGE_S = 60.0
log = logging.getLogger("safety.worker")


class OutputClosed(Exception):
    """The reader of the result lines (a pipe, a FIFO) went away; stdout then points at /dev/null."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """`safety worker`, `safety submit` and `safety job` (each also its own entry point)."""
    register_worker(subparsers)
    register_submit(subparsers)
    register_job(subparsers)


def register_worker(subparsers: argparse._SubParsersAction) -> None:
    w = subparsers.add_parser(
        "worker",
        help="run a Celery worker that classifies batch-job chunks",
        description="Consume SAFETY_QUEUE on SAFETY_REDIS_URL and classify chunks with SAFETY_MODEL.",
    )
    w.add_argument(
        "--pool",
        choices=("prefork", "solo", "threads"),
        help="default: solo on CUDA (run one worker per GPU), prefork on CPU",
    )
    w.add_argument(
        "-c",
        "--concurrency",
        type=positive_int,
        help="worker processes (prefork); default SAFETY_WORKER_CONCURRENCY or 1",
    )
    w.add_argument(
        "-n",
        "--hostname",
        help="Celery node name (default safety-PID@HOSTNAME: unique per process, so a worker that stops "
        "itself, for a model it cannot load or a broken device, never stops another on the same host)",
    )
    w.add_argument(
        "--max-tasks-per-child", type=positive_int, help="replace a prefork process after this many chunks"
    )
    w.add_argument(
        "--loglevel",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="default SAFETY_LOG_LEVEL",
    )
    w.set_defaults(func=run_worker)


def _int_at_least(text: str, low: int, what: str) -> int:
    """An argparse type's check: an integer of `low` or more, else refused as not `what` (argparse names the
    flag, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def index(text: str) -> int:
    """An argparse type: an item index, 0 or more."""
    return _int_at_least(text, 0, "an item index (0 or more)")


def positive_int(text: str) -> int:
    """An argparse type: 1 or more (Celery's own check of -c is a click traceback, and 0 meant 1)."""
    return _int_at_least(text, 1, "a positive integer")


def register_submit(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "submit",
        help="submit a JSONL file of items as a batch job",
        description='Each line of INPUT is one item: {"text": ..., "id"?: ..., "role"?: "prompt"|"response", '
        '"context"?: ...}. Every item is validated before anything is queued.',
    )
    s.add_argument("input", help="JSONL file of items ('-' for stdin)")
    s.add_argument("--out", help="with --wait: write result lines here, in item order (default stdout)")
    s.add_argument(
        "--wait", action="store_true", help="wait for the job (progress bar), then write its results"
    )
    s.add_argument("--job-id", help="name the job; re-running with the same id and file resumes it")
    s.add_argument(
        "--timeout",
        type=positive_seconds,
        help="with --wait: give up this many seconds after submitting (the wait and the results together)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_submit)


def register_job(subparsers: argparse._SubParsersAction) -> None:
    j = subparsers.add_parser(
        "job", help="status, results, cancellation or deletion of a batch job; the dead-lettered chunks"
    )
    commands = j.add_subparsers(
        dest="job_command", required=True, metavar="{status,results,cancel,delete,dead-letters}"
    )
    status = commands.add_parser("status", help="state and counts of a job (JSON)")
    status.add_argument("job_id")
    status.set_defaults(func=run_status)
    results = commands.add_parser("results", help="result lines in item order (waits for a running job)")
    results.add_argument("job_id")
    results.add_argument("--out", help="write here (default stdout)")
    results.add_argument("--timeout", type=positive_seconds, help="give up after this many seconds")
    results.add_argument(
        "--start",
        type=index,
        default=0,
        metavar="N",
        help="start at the result of item N (0-based), skipping the N before it: after a timeout, the "
        "number of lines already written",
    )
    results.set_defaults(func=run_results)
    cancel = commands.add_parser("cancel", help="skip a job's remaining chunks")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=run_cancel)
    delete = commands.add_parser(
        "delete",
        help="delete a finished or cancelled job's items, results and record "
        "(its id stays reserved until the job's TTL ends)",
    )
    delete.add_argument("job_id")
    delete.set_defaults(func=run_delete)
    dead = commands.add_parser(
        "dead-letters",
        help="the chunks given up after SAFETY_MAX_ATTEMPTS, newest first, one JSON line each",
        description='One JSON line per dead-lettered chunk, newest first: {"job_id", "chunk", "attempts", '
        '"error", "at"} ("at": epoch seconds, in Redis\'s clock). Redis keeps the newest 10,000.',
    )
    dead.add_argument("--limit", type=positive_int, default=100, help="print at most this many (default 100)")
    dead.set_defaults(func=run_dead_letters)


# ---- safety worker ---------------------------------------------------------------------------------------
def default_pool(device: str) -> str:
    """solo on a GPU (one process owns the device, no fork after CUDA init), prefork on CPU."""
    return "solo" if on_gpu(device) else "prefork"


def on_gpu(device: str) -> bool:
    """Will the engine run on CUDA, judged without torch (the prefork parent must not initialise CUDA, and
    importing torch costs it ~2 s and ~220 MB): SAFETY_DEVICE cuda[:N], or auto with an NVIDIA device node."""
    return device.startswith("cuda") or (device == "auto" and any(Path("/dev").glob("nvidia[0-9]*")))


def torch_threads_env(device: str, argv: list[str], environ: MutableMapping[str, str]) -> None:
    """OMP_NUM_THREADS for the engine in each worker process, unless set: the CPUs this process may use
    (affinity, cgroup quota = a Kubernetes CPU limit), not the node's core count, split among prefork
    children (each runs its own torch). On a GPU none: the engine takes 1 there (model/threads.py)."""
    if on_gpu(device):
        return
    concurrency = int(next(a for a in argv if a.startswith("--concurrency=")).split("=")[1])
    per_process = concurrency if "--pool=prefork" in argv else 1
    environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cpus() // per_process)))


def worker_argv(args: argparse.Namespace, settings: WorkerSettings) -> list[str]:
    pool = args.pool or default_pool(settings.device)
    concurrency = 1 if pool == "solo" else (args.concurrency or settings.concurrency or 1)
    argv = [
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={settings.queue}",
        f"--loglevel={(args.loglevel or settings.log_level).upper()}",
        "--without-gossip",
        "--without-mingle",
    ]
    # A worker that cannot go on asks its own node to shut down (`worker.tasks.stop_worker`, by node name):
    # Celery's default name, celery@HOSTNAME, is the same for every worker on a host (a laptop, a VM), and
    # the shutdown would stop them all. Kubernetes pods have their own hostnames; the pid costs nothing.
    argv.append(f"--hostname={args.hostname or f'safety-{os.getpid()}@%h'}")
    if args.max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={args.max_tasks_per_child}")
    return argv


def run_worker(args: argparse.Namespace) -> int:
    metrics_dir = None
    try:
        with _errors("worker"):
            settings = WorkerSettings.from_env()
            argv = worker_argv(args, settings)
            torch_threads_env(settings.device, argv, os.environ)
            if "--pool=prefork" in argv:
                # SIGTERM (Kubernetes) = Celery's cold shutdown after SAFETY_DRAIN_GRACE_S: the running chunk
                # is requeued at once rather than after the visibility timeout. Read by billiard at start.
                os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
            # solo and threads: SIGTERM stays Celery's warm shutdown, which lets the chunk in hand finish.
            # Their cold shutdown would wait out the grace inside the signal handler, on the thread running
            # the chunk (solo), then cancel it through a pool that cannot cancel (NotImplementedError: a
            # failed attempt).
            check_redis(settings)  # a wrong SAFETY_REDIS_URL stops here: Celery would retry it for ever
            # Logging before anything logs (the metrics address below): a JSON record, or a text line, until
            # Celery sets up its own handlers (json_logs gives them the JSON formatter).
            level = args.loglevel or settings.log_level
            if settings.log_format == "json":
                json_logs(level)
                argv = ["--quiet", *argv]  # no banner: every line of the log is a JSON object
            else:  # DEBUG waits for Celery's own setup: before it, Celery logs dumps of generated code
                configure_logs("INFO" if level.upper() == "DEBUG" else level, "text")
            if settings.metrics_port:
                metrics_dir = serve_metrics(settings.metrics_port, prefork="--pool=prefork" in argv)
            from worker.app import app
            from worker.reclaim import start_sweeper
            from worker.tasks import broker_warning, worker_failed

            if warning := broker_warning(app):
                log.warning("%s", warning)

            sweeper = start_sweeper(settings)  # re-sends chunks the broker lost (worker.reclaim)
            try:
                code = app.start(argv) or EXIT_OK
            finally:
                sweeper.stop()
            if worker_failed():
                print("safety worker: stopped: no model, or a broken device (see the log)", file=sys.stderr)
                return EXIT_ERROR
            return code
        return EXIT_ERROR
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def check_redis(settings: WorkerSettings) -> None:
    """ConfigError when SAFETY_REDIS_URL names something Redis refuses (a DB index out of range, a wrong
    password) or a server that is not Redis. Redis not answering yet is fine: Celery waits for it."""
    from model.errors import UnavailableError
    from worker.jobs import JobClient

    client = JobClient(settings)
    try:
        client.ping()
    except UnavailableError:
        pass
    finally:
        client.close()


def json_logs(level: str) -> None:
    """SAFETY_LOG_FORMAT=json: Celery sets up its handlers (level, stdout redirection) as usual, then each
    gets our JSON formatter; a record logged inside a task carries its `task_id` and `task_name`. Until
    Celery's handlers exist, a JSON root handler takes what comes earlier, Python warnings included (Celery
    warns before it sets up logging, e.g. when run as root). Celery's shutdown notices are records too."""
    from celery import signals
    from celery._state import get_current_task  # what Celery's own TaskFormatter reads

    from model.logs import JsonFormatter, configure

    configure(level, "json")
    logging.captureWarnings(True)

    class CeleryJsonFormatter(JsonFormatter):
        def format(self, record: logging.LogRecord) -> str:
            task = get_current_task()
            if task is not None and task.request.id is not None:
                record.task_id, record.task_name = task.request.id, task.name
            return super().format(record)

    def use_json(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            handler.setFormatter(CeleryJsonFormatter())

    signals.after_setup_logger.connect(use_json, weak=False)
    signals.after_setup_task_logger.connect(use_json, weak=False)
    # Celery prints its shutdown notices ("worker: Warm shutdown (MainProcess)", "Hitting Ctrl+C again ...")
    # with safe_say, an os.write past logging: make them records too.
    from celery.apps import worker as celery_worker

    notices = logging.getLogger("celery.apps.worker")
    celery_worker.safe_say = lambda msg, f=None: notices.info(str(msg).strip())


def serve_metrics(port: int, *, prefork: bool) -> str | None:
    """Start /metrics on `port` in this (the main) process; returns the multiprocess directory it created,
    if any, for the caller to remove. With prefork the tasks count in the pool's child processes: the counts
    go through files in PROMETHEUS_MULTIPROC_DIR (set here, before prometheus_client is first imported, and
    inherited by the children), and the exporter serves their sum."""
    created = None
    if prefork and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        created = tempfile.mkdtemp(prefix="safety-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = created
    from worker import metrics

    try:
        server = metrics.serve(port)
    except OSError as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        why = f"cannot serve metrics on port {port}: {e.strerror}"
        raise ConfigError(why, field=env_name("metrics_port"), file="environment") from None
    log.info(
        "Prometheus metrics on :%d/metrics", server.server_port, extra={"metrics_port": server.server_port}
    )
    return created


# ---- safety submit ---------------------------------------------------------------------------------------
def _source(path: str) -> str:
    """How an error names the items file ("-": standard input)."""
    return "stdin" if path == "-" else path


class ItemsFile:
    """The items of a JSONL file ("-": standard input), parsed one at a time as they are iterated (once),
    never held together, by `model.jsonl.jsonl_values` as `safety classify --jsonl` reads its items: lines
    end at LF only, blank lines are skipped, not items, and a line that is not UTF-8 or not JSON is an
    InvalidInputError naming the line. Opening it raises OSError. A context manager: leaving it closes the
    file (or stdin)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # bytes, decoded a line at a time: a byte that is not UTF-8 is named by its own line (a text stream's
        # decoder raises from a read-ahead chunk, mid-iteration, without the line); a stdin without a byte
        # buffer (a StringIO in tests) is already text
        self.stream: IO[bytes] | IO[str] = (
            getattr(sys.stdin, "buffer", sys.stdin) if path == "-" else open(path, "rb")  # noqa: SIM115
        )
        self._last = (-1, 0)  # index and line number of the item read last

    def __enter__(self) -> ItemsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()

    def __iter__(self) -> Iterator[Any]:
        source = _source(self.path)
        values = jsonl_values(self.stream, lambda n: f"{source} line {n}", source)
        for index, (number, item) in enumerate(values):
            self._last = (index, number)
            yield item

    def line_of(self, index: int) -> int | None:
        """The line number of item `index` if it is the one read last (the item a check just refused)."""
        last, number = self._last
        return number if index == last else None


def _resume(args: argparse.Namespace, job_id: str) -> str:
    """The `safety submit` that resumes job `job_id` as this one was asked to run."""
    again = f"safety submit {args.input} --job-id {job_id}" + (" --wait" if args.wait else "")
    return again + (f" --out {args.out}" if args.out else "")


def _prepare(client: JobClient, items: ItemsFile) -> Prepared:
    """Read and check every item, spooled one at a time: nothing reaches Redis before the last one passed.
    An item's error names its line ("FILE line 3: items[1].role: ...")."""
    try:
        return client.prepare(items, spool=True)
    except InvalidInputError as e:
        line = None if e.index is None else items.line_of(e.index)
        if line is None:
            raise
        raise InvalidInputError(str(e), field=f"{_source(items.path)} line {line}") from None


def run_submit(args: argparse.Namespace) -> int:
    from worker.jobs import JobClient

    client = None
    job_id = args.job_id or uuid.uuid4().hex  # known before anything is sent, so an interrupt can name it
    sent = False  # from the first write to Redis on, an interrupt leaves a job behind
    interrupted = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers may be set
    previous = signal.signal(signal.SIGINT, interrupt) if main_thread else None
    try:
        with _errors("submit"):
            if args.job_id is not None:  # before the items are read; an empty one is not "no id"
                _check_job_id(args.job_id)
            if args.out is not None and not args.wait:  # without --wait there are no results to write
                raise InvalidInputError(
                    "needs --wait; or read the results later with: "
                    f"safety job results JOB_ID --out {args.out}",
                    field="--out",
                )
            if args.timeout is not None and not args.wait:  # nothing to wait for
                raise InvalidInputError(
                    "needs --wait (submitting does not wait for the job)", field="--timeout"
                )
            try:
                items = ItemsFile(args.input)
            except OSError as e:
                raise InvalidInputError(f"cannot read {args.input}: {e.strerror}", field="input") from None
            with items:
                if args.wait:
                    _check_out(args.out)  # before the job runs, not after it finished
                client = JobClient.from_env(notice=_notice("submit"))
                prepared = _prepare(client, items)
            with prepared:
                sent = True
                try:
                    submitted = client.send(prepared, job_id=job_id)
                except JobBusyError:  # another submit holds the job: this one sent nothing
                    raise
                except UnavailableError as e:  # Redis went away part way
                    raise UnavailableError(
                        f"{e}; job {job_id} may be partly submitted: once Redis answers, resume it with: "
                        f"{_resume(args, job_id)}"
                    ) from None
            job_id = submitted.status.job_id
            if submitted.status.state == "cancelled":  # cancelled before (a resume) or during this submit
                print(
                    f"job {job_id} was cancelled: this submit sent {count(submitted.sent, 'chunk')} of "
                    f"{submitted.status.chunks} and stopped; what it classified: safety job results {job_id}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            verb = "resumed" if submitted.resumed else "submitted"
            counts = f"{count(submitted.status.total, 'item')}, {count(submitted.sent, 'chunk')} sent"
            print(f"{verb} job {job_id}: {counts}", file=sys.stderr)
            if not args.wait:
                try:
                    _stdout(job_id)
                except OutputClosed:
                    return EXIT_PIPE
                return EXIT_OK
            # --timeout is one deadline, from here, for the wait and the results after it (as `job results`)
            deadline = _deadline(args.timeout)
            again = f"safety job results {job_id}" + (f" --out {args.out}" if args.out else "")
            with _after_outage(job_id, args.out, _resume(args, job_id)):
                progress = not args.no_progress
                with _on_timeout(
                    f"`safety job status {job_id}` shows its progress, `{again}` writes its results"
                ):
                    status = _wait_with_progress(client, submitted.status, args.timeout, progress)
                # the job has finished: a timeout now is one of reading its results, which Redis keeps
                tally = Tally()
                with _on_timeout(
                    f"the job is {status.state}, its results are kept: `{again}` writes them",
                    goes_on=False,
                    tally=tally,
                ):
                    try:
                        written = _write_results(
                            client, job_id, args.out, _left(deadline), known=status, tally=tally
                        )
                    except OutputClosed:
                        return EXIT_PIPE
            where = args.out or "stdout"
            summary = f"{status.done} done, {status.failed} failed; {count(written, 'line')} to {where}"
            print(f"job {job_id} {status.state}: {summary}", file=sys.stderr)
            return EXIT_OK if status.state == "done" and status.failed == 0 else EXIT_FAILED
        if not interrupted:
            return EXIT_ERROR
    except BaseException:
        # Ctrl-C, or an error it caused while unwinding (a Redis connection cut mid-command): an interrupt
        if not interrupted:
            raise
    finally:
        if main_thread and previous is not None:  # None: a handler not set from Python, left as it was
            signal.signal(signal.SIGINT, previous)
        if client is not None:
            with suppress(Exception):  # a connection the interrupt left mid-command
                client.close()
    if sent:
        print(f"\ninterrupted; job {job_id} goes on. Resume with: {_resume(args, job_id)}", file=sys.stderr)
    else:
        said = "\ninterrupted before this run sent anything to Redis: it submitted nothing"
        if args.job_id:  # it may exist from an earlier run, which this one did not touch
            said += f" (job {job_id}, if an earlier run made it, is as it was)"
        print(said, file=sys.stderr)
    return EXIT_INTERRUPTED


def _check_job_id(job_id: str) -> None:
    """Refuse a --job-id the job client would refuse (only after reading every item), naming the flag."""
    from worker.store import check_job_id

    try:
        check_job_id(job_id)
    except InvalidInputError as e:
        raise InvalidInputError(
            f"{e.reason}; leave --job-id out to have one made", field="--job-id"
        ) from None


class Tally:
    """How many result lines a command wrote where they stay written if it stops part way (stdout, a FIFO, a
    device: not a file, which is written whole or not at all), and where (`_write_results`); `start`: the
    item index its first line was (`job results --start`)."""

    def __init__(self, start: int = 0) -> None:
        self.lines, self.where, self.start = 0, "stdout", start


@contextmanager
def _on_timeout(what_next: str, *, goes_on: bool = True, tally: Tally | None = None) -> Iterator[None]:
    """A wait that ran out of --timeout says that the job goes on (`goes_on`; a job that has finished does
    not), and how to carry on with it; after result lines went where they stay (`tally`), how many did, and
    the `job results --start` that carries on after them."""
    try:
        yield
    except DeadlineExceededError as e:
        said = f"{e}; {'the job goes on: ' if goes_on else ''}{what_next}"
        if tally is not None and tally.lines:
            said += (
                f" ({count(tally.lines, 'result line')} already went to {tally.where} before the timeout; "
                f"carry on after them with --start {tally.start + tally.lines})"
            )
        raise DeadlineExceededError(said) from None


def _deadline(timeout: float | None) -> float | None:
    """The monotonic time a --timeout of `timeout` seconds, counted from now, ends (None: no --timeout)."""
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (`_deadline`), never below 0; None without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@contextmanager
def _after_outage(job_id: str, out: str | None, submit_again: str) -> Iterator[None]:
    """Redis did not answer for REDIS_OUTAGE_S while this command waited for the job or read its results
    (UnavailableError): say where the job is and what to run once Redis is back."""
    try:
        yield
    except UnavailableError as e:
        raise UnavailableError(
            f"{e}. The job is kept in Redis, not in this process: once Redis answers again, see it with "
            f"`safety job status {job_id}` and write its results with `safety job results {job_id} --out "
            f"{out or 'FILE'}`. If Redis restarted without persistence, the job is lost: submit it again "
            f"(`{submit_again}`)"
        ) from e


def _wait_with_progress(client: Any, submitted: Any, timeout: float | None, progress: bool) -> Any:
    """Wait for the job this command just submitted (its status then: `submitted`), a bar showing progress."""
    from tqdm import tqdm

    job_id = submitted.job_id
    with tqdm(
        total=submitted.total, unit="item", desc=f"job {job_id[:12]}", disable=not progress, file=sys.stderr
    ) as bar:

        def update(st: Any) -> None:
            bar.set_postfix_str(st.state + (f", {st.failed} failed" if st.failed else ""), refresh=False)
            bar.update(st.completed - bar.n)

        return client.wait(
            job_id, timeout=timeout, on_progress=update, outage_s=REDIS_OUTAGE_S, known=submitted
        )


def _write_results(
    client: Any,
    job_id: str,
    out: str | None,
    timeout: float | None,
    *,
    known: Any = None,
    tally: Tally | None = None,
    start: int = 0,
) -> int:
    """Stream result lines in item order; a file is written whole or not at all (temp file + rename).
    OutputClosed when the reader of stdout (or of a FIFO) went away. `known`: the job's status as this
    command last read it, if it did (`JobClient.results`). `tally`: counts the lines written to stdout, a
    FIFO or a device, which stay there if the command stops part way. `start`: the first item index."""
    stays = out is None or out == "-" or _out_kind(out) == "special"
    if tally is not None and out not in (None, "-"):
        tally.where = out
    try:
        with _output(out) as stream:
            written = 0
            lines = client.results(job_id, start=start, timeout=timeout, outage_s=REDIS_OUTAGE_S, known=known)
            for line in lines:
                stream.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
                if tally is not None and stays:
                    tally.lines += 1
    except BrokenPipeError:
        if out is None or out == "-":
            silence_stdout()
        raise OutputClosed from None
    return written


def _stdout(text: str) -> None:
    """Print `text` on stdout; OutputClosed when its reader went away (`safety job status J | head -1`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence_stdout()
        raise OutputClosed from None


def _check_out(out: str | None) -> str | None:
    """Refuse an --out that cannot be written, naming it (exit 2, like any bad argument): before the job runs,
    not after it finished. -> what it names (`_out_kind`; None for stdout)."""
    if out is None or out == "-":
        return None
    kind = _out_kind(out)
    if kind == "directory":
        raise InvalidInputError(f"cannot write {out}: it is a directory; name a file", field="--out")
    if kind == "special":  # a FIFO, a device, /dev/stdout: written in place
        if not os.access(out, os.W_OK):
            raise InvalidInputError(f"cannot write {out}: no write permission", field="--out")
        return kind
    parent = _real_target(out).parent
    if not parent.exists():
        raise InvalidInputError(
            f"cannot write {out}: {parent} does not exist; create it first", field="--out"
        )
    if not parent.is_dir():
        raise InvalidInputError(f"cannot write {out}: {parent} is not a directory", field="--out")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"cannot write {out}: no write permission in {parent}", field="--out")
    return kind


def _out_kind(out: str) -> str:
    """What --out names, symlinks followed: "file" (a regular file, or nothing yet), "directory", or
    "special" (a FIFO, a character or block device, a socket, /dev/stdout's pipe or terminal)."""
    if out.startswith(("/dev/", "/proc/")):  # /dev/stdout, /dev/fd/N: the caller's descriptor, whatever it is
        return "special"
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        return "file"  # nothing there yet (or a dangling symlink: its target is created)
    except OSError:
        return "file"  # e.g. a parent that is not a directory: _check_out names that
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "special"


def _real_target(out: str) -> Path:
    """The file a regular --out finally names: symlinks resolved, so the partial file is written next to the
    real target and renamed onto it, and the symlink stays a symlink."""
    return Path(os.path.realpath(out))


@contextmanager
def _output(out: str | None) -> Iterator[IO[str]]:
    """A regular file is written to `TARGET.partial` next to the real target and renamed onto it when
    complete, so it is always whole; a FIFO or a device is written in place (it cannot be replaced); a
    directory is refused."""
    if out is None or out == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    if _check_out(out) == "special":  # checked again: the job may have run for hours since
        # appended: /dev/stdout redirected with >> to a file keeps what the file had (a FIFO or a device is
        # the same either way)
        with _open_out(out, "a") as stream:
            yield stream
        return
    target = _real_target(out)
    partial = target.with_name(target.name + ".partial")
    try:
        with _open_out(partial, "w") as stream:
            yield stream
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _open_out(path: str | Path, mode: str) -> IO[str]:
    try:
        return open(path, mode, encoding="utf-8")
    except OSError as e:
        raise InvalidInputError(f"cannot write {path}: {e.strerror}", field="--out") from None


# ---- safety job ------------------------------------------------------------------------------------------
def run_status(args: argparse.Namespace) -> int:
    return _job_call("status", lambda client: _print_json(client.status(args.job_id).to_dict()))


def run_cancel(args: argparse.Namespace) -> int:
    return _job_call("cancel", lambda client: _print_json(client.cancel(args.job_id).to_dict()))


def run_delete(args: argparse.Namespace) -> int:
    return _job_call("delete", lambda client: _print_json(client.delete(args.job_id).to_dict()))


def run_dead_letters(args: argparse.Namespace) -> int:
    def show(client: Any) -> None:
        for entry in client.dead_letters(args.limit):
            _stdout(json.dumps(entry, ensure_ascii=False))

    return _job_call("dead-letters", show)


def run_results(args: argparse.Namespace) -> int:
    def results(client: Any) -> int:
        deadline = _deadline(args.timeout)  # one deadline for the results and the outcome after them
        again = f"safety job results {args.job_id}" + (f" --out {args.out}" if args.out else "")
        again += f" --start {args.start}" if args.start else ""
        tally = Tally(args.start)
        with (
            _after_outage(args.job_id, args.out, f"safety submit FILE --job-id {args.job_id}"),
            _on_timeout(f"run `{again}` again, with a longer --timeout or none", tally=tally),
        ):
            try:  # --out is checked before the first result is read
                _write_results(client, args.job_id, args.out, args.timeout, tally=tally, start=args.start)
            except OutputClosed:
                return EXIT_PIPE
            # the job's outcome, for the exit code: within what is left of --timeout, like the results
            status = client.status(args.job_id, outage_s=REDIS_OUTAGE_S, timeout=_left(deadline))
        return EXIT_OK if status.state == "done" and status.failed == 0 else EXIT_FAILED

    return _job_call("results", results)


def _print_json(obj: dict[str, Any]) -> None:
    _stdout(json.dumps(obj, indent=2))


def _job_call(command: str, fn: Any) -> int:
    from worker.jobs import JobClient

    client = None
    try:
        with _errors(f"job {command}"):
            client = JobClient.from_env(notice=_notice(f"job {command}"))
            return fn(client) or EXIT_OK
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OutputClosed:
        return EXIT_PIPE
    finally:
        if client is not None:
            client.close()


def _notice(command: str) -> Callable[[str], None]:
    """What the job client says while it waits (on another process submitting the job): a line on stderr,
    above the progress bar if one is shown."""

    def say(message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"safety {command}: {message}", file=sys.stderr)

    return say


@contextmanager
def _errors(command: str) -> Iterator[None]:
    """Print a SafetyError as one line on stderr; the caller returns EXIT_ERROR after the block."""
    try:
        yield
    except SafetyError as e:
        print(f"safety {command}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.cli ...`: the same subcommands without the `safety` entry point."""
    parser = argparse.ArgumentParser(prog="safety")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
