"""Signals of the `safety serve` process (`service.server.serve` in this process's main thread, where
asyncio installs signal handlers, with real signals sent to it): SIGHUP only logs; a drain whose grace
expires, or that a second signal cuts short, says how many calls it cut and exits 1."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import watch
from service.client import SafetyClient, error_details
from service.server import serve
from service.settings import ServeSettings
from service.stubs import pb2_grpc
from tests.prometheus import scrape
from tests.service.helpers import request, wait_until
from tests.service.pki import make_ca, make_leaf, served_serial
from tests.worker.harness import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Records(logging.Handler):
    """The records of `safety.service` (serve() replaces the root logger's handlers, caplog's too)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def find(self, text: str) -> logging.LogRecord | None:
        return next((r for r in self.records if text in r.getMessage()), None)

    def index(self, text: str) -> int:
        """Position of the first record whose message contains `text` (-1: none)."""
        return next((i for i, r in enumerate(self.records) if text in r.getMessage()), -1)


@pytest.fixture
def records() -> Iterator[Records]:
    logger, handler = logging.getLogger("safety.service"), Records()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    root.handlers[:], root.level = saved


def health_status(port: int, ca: Path | None = None) -> Any:
    """The server's grpc.health.v1 status (over TLS trusting `ca` when given); None if it does not answer."""
    if ca is None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    else:
        channel = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca.read_bytes()))
    with channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check
            return check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None


def serving(port: int) -> bool:
    return health_status(port) == SERVING


def run_serve(
    classifier: Any,
    grace: float,
    client: Callable[[int], None],
    ready: Callable[[int], bool] = serving,
    **settings: Any,
) -> int:
    """serve() on a free port in this (the main) thread, `client(port)` in another once `ready(port)`
    (default: SERVING over plaintext); serve's exit code. `settings`: more ServeSettings fields (TLS)."""
    port = free_port()
    values = {"metrics_address": None, "drain_grace_s": grace, "log_format": "text", **settings}
    failure: list[BaseException] = []

    def drive() -> None:
        try:
            wait_until(lambda: ready(port), timeout=30, what="SERVING")
            client(port)
        except BaseException as e:
            failure.append(e)
            os.kill(os.getpid(), signal.SIGTERM)  # don't leave serve() running

    thread = threading.Thread(target=drive)
    thread.start()
    with asyncio.Runner() as runner:
        try:
            code = runner.run(serve(ServeSettings(address=f"127.0.0.1:{port}", **values), classifier))
        finally:
            # Before the loop closes: until then serve()'s signal handlers stay installed, so a signal the
            # client sends after serve() returned (a test failing) is ignored instead of killing pytest.
            thread.join(30)
    if failure:
        raise failure[0]
    return code


Held = tuple[threading.Event, threading.Event]


@pytest.fixture
def slow_batches(tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch) -> Held:
    """(entered, release): a batch sets `entered` on the device, then waits for `release` (the test sets it
    once the call is cut)."""
    entered, release, launch = threading.Event(), threading.Event(), tiny_classifier.launch

    def slow(sequences: Any) -> Any:
        entered.set()
        release.wait(30)
        return launch(sequences)

    monkeypatch.setattr(tiny_classifier, "launch", slow)
    return entered, release


def test_sighup_does_not_stop_the_server(tiny_classifier: Any, records: Records) -> None:
    def client(port: int) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: records.find("SIGHUP") is not None, what="the SIGHUP log line")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert pb2_grpc.SafetyClassifierStub(channel).Classify(request("still here"), timeout=10).results
        os.kill(os.getpid(), signal.SIGTERM)

    assert run_serve(tiny_classifier, 5.0, client) == 0
    assert "re-read when their files change" in records.find("SIGHUP").getMessage()
    assert records.find("draining") is not None and records.find("cutting") is None


def cut_call(port: int, held: Held, signals: int) -> tuple[grpc.StatusCode, float]:
    """A Classify held by `slow_batches`, then SIGTERM (and, `signals`=2, SIGINT at once after it): the
    call's status code, and seconds from the first signal to the client seeing it."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb2_grpc.SafetyClassifierStub(channel).Classify.future(request("held"), timeout=60)
        entered, release = held
        assert entered.wait(10), "the call never reached the device"
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        if signals == 2:
            wait_until(lambda: not serving(port), what="NOT_SERVING")
            os.kill(os.getpid(), signal.SIGINT)
        try:
            call.result(30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        seconds = time.monotonic() - t0
    release.set()
    return code, seconds


def test_expired_grace_warns_with_the_calls_cut_and_exits_1(
    tiny_classifier: Any, slow_batches: Held, records: Records
) -> None:
    seen: dict[str, Any] = {}

    def client(port: int) -> None:
        seen["code"], seen["seconds"] = cut_call(port, slow_batches, signals=1)

    assert run_serve(tiny_classifier, 1.0, client) == 1
    assert seen["code"] == grpc.StatusCode.UNAVAILABLE and seen["seconds"] >= 1.0
    warning = records.find("drain grace expired")
    assert warning is not None and warning.levelno == logging.WARNING
    assert warning.in_flight == 1 and "cutting 1 calls" in warning.getMessage()


def test_a_second_signal_stops_the_drain_at_once(
    tiny_classifier: Any, slow_batches: Held, records: Records
) -> None:
    seen: dict[str, Any] = {}

    def client(port: int) -> None:
        seen["code"], seen["seconds"] = cut_call(port, slow_batches, signals=2)

    assert run_serve(tiny_classifier, 30.0, client) == 1
    assert seen["code"] == grpc.StatusCode.UNAVAILABLE and seen["seconds"] < 15  # not the 30 s grace
    assert records.find("second signal: stopping at once") is not None
    assert records.find("stopping at once (second signal): cutting 1 calls") is not None


def test_sighup_re_reads_tls_files_the_watch_cannot_tell_changed(
    tiny_classifier: Any, records: Records, tmp_path: Path
) -> None:
    """The TLS files are watched by modification time, size and inode (service/watch.py). A new certificate
    and key written into the same files, at the same sizes, with their old modification times put back, go
    unnoticed by the watch; SIGHUP re-reads them at once, and new connections get the new certificate."""
    ca = make_ca(tmp_path, "ca")
    old, new = make_leaf(tmp_path, "old", ca, serial=1001), make_leaf(tmp_path, "new", ca, serial=2002)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    rotated: dict[Path, bytes] = {}
    for path, before, after in ((cert, old[0], new[0]), (key, old[1], new[1])):
        pems = before.read_bytes(), after.read_bytes()
        size = max(map(len, pems))  # PEM readers skip the blank lines that pad the shorter one
        path.write_bytes(pems[0].ljust(size, b"\n"))
        rotated[path] = pems[1].ljust(size, b"\n")

    def client(port: int) -> None:
        assert served_serial(port, ca[0]) == 1001
        signature = watch.signature(str(cert), str(key))
        for path, pem in rotated.items():
            stat = path.stat()
            with path.open("r+b") as f:  # in place: the same inode
                f.write(pem)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert watch.signature(str(cert), str(key)) == signature, "the watch would see this rotation"
        assert served_serial(port, ca[0]) == 1001  # unnoticed until SIGHUP
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: records.find("TLS files re-read") is not None, what="the TLS files re-read")
        assert served_serial(port, ca[0]) == 2002
        with SafetyClient(f"localhost:{port}", ca=ca[0], timeout=10) as c:
            assert c.classify(["over the new certificate"])
        os.kill(os.getpid(), signal.SIGTERM)

    def ready(port: int) -> bool:
        return health_status(port, ca[0]) == SERVING

    code = run_serve(tiny_classifier, 5.0, client, ready, tls_cert=str(cert), tls_key=str(key))
    assert code == 0
    assert records.index("SIGHUP") < records.index("TLS files re-read")


@pytest.fixture
def held_on_broken_device(tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch) -> Held:
    """(tokenizing, release): a call whose text is "held" sets `tokenizing` while being tokenized and waits
    there for `release` (a call in flight during a drain); every batch hits a sticky CUDA error (simulated:
    no GPU here)."""
    tokenizing, release, encode = threading.Event(), threading.Event(), tiny_classifier.encode

    def held_encode(items: Any) -> Any:
        if any(item.text == "held" for item in items):
            tokenizing.set()
            release.wait(30)
        return encode(items)

    def broken(sequences: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiny_classifier, "encode", held_encode)
    monkeypatch.setattr(tiny_classifier, "launch", broken)
    return tokenizing, release


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_first_signal_after_a_device_failure_lets_its_drain_finish(
    tiny_classifier: Any, held_on_broken_device: Held, records: Records, sig: signal.Signals
) -> None:
    """A sticky CUDA error (simulated: no GPU here) makes serve() go NOT_SERVING and drain on its own. A
    SIGTERM/SIGINT during that drain is the first signal, not a second one: logged, it leaves the drain to
    finish the calls in flight (none is cut), and serve() exits 1 because the device failed."""
    tokenizing, release = held_on_broken_device
    seen: dict[str, Any] = {}

    def client(port: int) -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb2_grpc.SafetyClassifierStub(channel)
                held = stub.Classify.future(request("held"), timeout=60)
                assert tokenizing.wait(10), "the held call never reached the tokenizer"
                with pytest.raises(grpc.RpcError) as failed:
                    stub.Classify(request("breaks the device"), timeout=10)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "the device failed" in failed.value.details()
                drain = "the device failed: NOT_SERVING, draining, exiting 1"
                wait_until(lambda: records.find(drain) is not None, what="the drain after the device failed")
                os.kill(os.getpid(), sig)
                wait_until(lambda: records.find("signal received") is not None, what="the signal logged")
                assert not held.done()  # the signal cut nothing: the drain still waits for it
                wait_until(lambda: health_status(port) == NOT_SERVING, what="NOT_SERVING while draining")
                with pytest.raises(grpc.RpcError) as late:  # a new call: the replica is being replaced,
                    stub.Classify(request("late"), timeout=10)  # not rolled (it said SHUTTING_DOWN)
                late_details = error_details(late.value)
                assert late_details is not None and late_details.reason == "DEVICE_FAILED", late_details
                assert late.value.details().startswith("the device failed (RuntimeError: CUDA error")
                release.set()
                try:
                    held.result(30)
                    seen["held"] = grpc.StatusCode.OK, ""
                except grpc.RpcError as e:
                    seen["held"] = e.code(), e.details()
        finally:
            release.set()

    assert run_serve(tiny_classifier, 30.0, client) == 1
    # the held call was not cut: tokenized, it was refused because a failed device admits nothing more, and
    # the refusal says so (not a plain "shutting down": the replica is restarting, not being rolled)
    code, details = seen["held"]
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert "the device failed (RuntimeError: CUDA error" in details and "restarting" in details, details
    failure = records.find("the device failed: NOT_SERVING, draining, exiting 1")
    assert failure is not None and failure.levelno == logging.CRITICAL
    assert records.find("the device failed for good: RuntimeError") is not None  # the scheduler's
    first = records.find("signal received")
    assert first is not None and first.getMessage() == "signal received while draining"
    assert records.index("the device failed: NOT_SERVING") < records.index("signal received while draining")
    assert records.find("second signal") is None and records.find("cutting") is None
    assert records.find("stopped with") is None and records.find("stopped") is not None


# ---- the final scrape after a device failure ------------------------------------------------------------
WAITING = "the device failed: waiting for a scrape of the final metrics"


@pytest.fixture
def broken_device(tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The tiny classifier with a sticky CUDA error (simulated: no GPU here) on its first batch."""

    def broken(sequences: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiny_classifier, "launch", broken)
    return tiny_classifier


def fail_the_device(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as failed:
        pb2_grpc.SafetyClassifierStub(channel).Classify(request("breaks the device"), timeout=10)
    assert (
        failed.value.code() == grpc.StatusCode.UNAVAILABLE and "the device failed" in failed.value.details()
    )


def test_after_a_device_failure_metrics_stay_up_until_a_scrape_has_read_the_drops(
    broken_device: Any, records: Records
) -> None:
    """The replica exits right after the drain that follows a device failure, well before the next scrape
    in practice: Prometheus would never see `safety_device_failed` = 1 and SafetyDeviceFailed would not
    fire. So /metrics stays up until a scrape has read it, and then serve() ends at once (not at the end of
    the 30 s grace)."""
    metrics_port, seen = free_port(), {}

    def client(port: int) -> None:
        scrape(metrics_port)  # Prometheus scrapes this replica
        fail_the_device(port)
        wait_until(lambda: records.find(WAITING) is not None, what="the wait for a final scrape")
        assert health_status(port) is None, "the gRPC server is stopped by now: only /metrics is left"
        seen["scraped"] = scrape(metrics_port)["safety_device_failed"]
        seen["at"] = time.monotonic()

    assert run_serve(broken_device, 30.0, client, metrics_address=f"127.0.0.1:{metrics_port}") == 1
    assert seen["scraped"] == 1
    assert time.monotonic() - seen["at"] < 10, "serve() waited on after the scrape"
    assert records.index(WAITING) < records.index("the final metrics were scraped") < records.index("stopped")
    assert records.find("no scrape of the final metrics") is None
    with pytest.raises(OSError):  # and /metrics is gone with the process's server
        scrape(metrics_port)


def test_without_a_scrape_the_wait_ends_with_the_drain_grace(broken_device: Any, records: Records) -> None:
    metrics_port = free_port()

    def client(port: int) -> None:
        scrape(metrics_port)  # scraped before, not after
        fail_the_device(port)

    started = time.monotonic()
    assert run_serve(broken_device, 2.0, client, metrics_address=f"127.0.0.1:{metrics_port}") == 1
    warning = records.find("no scrape of the final metrics")
    assert warning is not None and warning.getMessage().endswith("the drain grace expired")
    assert warning.levelno == logging.WARNING and records.index(WAITING) < records.index("no scrape of")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_wait_for_the_final_scrape(
    broken_device: Any, records: Records, sig: signal.Signals
) -> None:
    """Kubernetes deleting the pod, or the kubelet restarting the container, must not wait on a scrape."""
    metrics_port = free_port()

    def client(port: int) -> None:
        scrape(metrics_port)
        fail_the_device(port)
        wait_until(lambda: records.find(WAITING) is not None, what="the wait for a final scrape")
        os.kill(os.getpid(), sig)

    started = time.monotonic()
    assert run_serve(broken_device, 60.0, client, metrics_address=f"127.0.0.1:{metrics_port}") == 1
    assert time.monotonic() - started < 30, "the signal did not end the wait"
    warning = records.find("no scrape of the final metrics")
    assert warning is not None and warning.getMessage().endswith("a signal")
    assert records.find("second signal") is None  # the first signal did it, without cutting anything


def test_a_replica_never_scraped_does_not_wait_for_a_final_scrape(
    broken_device: Any, records: Records
) -> None:
    """`make run`, `docker run`, a cluster without Prometheus: nothing will scrape it, and waiting out the
    grace would only delay its restart (it waited the whole grace)."""
    started = time.monotonic()
    assert run_serve(broken_device, 20.0, fail_the_device, metrics_address=f"127.0.0.1:{free_port()}") == 1
    assert time.monotonic() - started < 15, "serve() waited for a scrape that could not come"
    assert records.find("/metrics was never scraped, so no final scrape is waited for") is not None
    assert records.find(WAITING) is None and records.find("no scrape of the final metrics") is None


def test_a_device_failure_during_a_signals_drain_waits_for_no_scrape(
    tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch, records: Records
) -> None:
    """The pod is deleted (SIGTERM, the drain starts), then the batch in flight hits a sticky CUDA error:
    the signal came first, so the drain waits for nothing beyond its calls (it waited for a scrape until the
    grace ran out)."""
    entered, release = threading.Event(), threading.Event()

    def broken(sequences: Any) -> Any:
        entered.set()
        release.wait(30)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiny_classifier, "launch", broken)
    metrics_port, at = free_port(), {}

    def client(port: int) -> None:
        scrape(metrics_port)  # a scraped replica: only the signal spares it the wait
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb2_grpc.SafetyClassifierStub(channel).Classify.future(request("x"), timeout=30)
            assert entered.wait(10), "the call never reached the device"
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until(lambda: records.find("draining") is not None, what="the drain")
            at["failed"] = time.monotonic()
            release.set()
            with pytest.raises(grpc.RpcError) as failed:
                call.result(30)
            assert "the device failed" in failed.value.details()

    assert run_serve(tiny_classifier, 20.0, client, metrics_address=f"127.0.0.1:{metrics_port}") == 1
    assert time.monotonic() - at["failed"] < 15, "serve() waited for a scrape after the signal's drain"
    warning = records.find("no scrape of the final metrics")
    assert warning is not None and warning.getMessage().endswith("a signal")


def test_the_final_scrape_is_one_begun_after_the_drain_ended_every_call(
    tiny_classifier: Any, held_on_broken_device: Held, records: Records
) -> None:
    """A call in flight at the failure ends (UNAVAILABLE) during the drain and is counted then: a scrape
    between the failure and that end did not read it, so it must not end the wait (it did, and the count
    was never exported)."""
    tokenizing, release = held_on_broken_device
    metrics_port, seen = free_port(), {}
    unavailable = 'safety_requests_total{code="UNAVAILABLE",method="Classify"}'

    def client(port: int) -> None:
        scrape(metrics_port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb2_grpc.SafetyClassifierStub(channel)
            held = stub.Classify.future(request("held"), timeout=60)
            assert tokenizing.wait(10), "the held call never reached the tokenizer"
            with pytest.raises(grpc.RpcError):
                stub.Classify(request("breaks the device"), timeout=10)
            wait_until(lambda: records.find("the device failed: NOT_SERVING") is not None, what="the drain")
            # grpc.aio sends an abort's status before the handler (and the interceptor counting it) ends, so
            # the failed call may be counted a moment after this client has its error: scrape until it is.
            # Every one of these scrapes comes before the held call ended, none may end the wait.
            wait_until(lambda: scrape(metrics_port)[unavailable] == 1, what="the failed call's count")
            seen["during"] = scrape(metrics_port)[unavailable]  # still before the held call ended
            release.set()
            with pytest.raises(grpc.RpcError):
                held.result(30)
            wait_until(lambda: records.find(WAITING) is not None, what="the wait for a final scrape")
            seen["final"] = scrape(metrics_port)[unavailable]

    assert run_serve(tiny_classifier, 30.0, client, metrics_address=f"127.0.0.1:{metrics_port}") == 1
    assert (seen["during"], seen["final"]) == (1, 2)  # the failed call, then the held one too
    assert records.index(WAITING) < records.index("the final metrics were scraped")
