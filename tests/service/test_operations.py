"""What a gateway operator relies on: health states, reflection, metrics, API key, TLS, deadlines, admission
and draining — each against a real server on port 0."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.client import SafetyClient
from service.server import SafetyServer, create_server
from service.settings import ServeSettings
from service.stubs import SERVICE_NAME, pb2, pb2_grpc
from service.tls import TlsFiles, load
from tests.service.helpers import answer_code, in_queue, metric_value, request, scrape, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_not_serving_until_loaded_then_serving_then_draining(
    loop_thread: Any, tiny_classifier: Any, stub_for: Any
) -> None:
    loaded = threading.Event()

    def slow_loader() -> Any:
        assert loaded.wait(30)
        return tiny_classifier

    app = loop_thread.run(
        create_server(ServeSettings(address="127.0.0.1:0", metrics_address=None), slow_loader)
    )
    starting = loop_thread.submit(app.start())
    try:
        wait_until(lambda: _answers(app.port), what="server up")
        assert health_status(app.port) == NOT_SERVING
        assert health_status(app.port, SERVICE_NAME) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub_for(app).Classify(request("hi"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        loaded.set()
        starting.result(30)
        assert health_status(app.port) == SERVING
        assert health_status(app.port, SERVICE_NAME) == SERVING
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:  # Watch streams the state too
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == SERVING
            watch.cancel()

        # Drain with a call in flight: NOT_SERVING and UNAVAILABLE for new calls while it finishes.
        stub = stub_for(app)
        app.scheduler.hold_runner()
        in_flight = stub.Classify.future(request("still running"), timeout=30)
        wait_until(lambda: in_queue(app) == 1, what="call queued")
        draining = loop_thread.submit(app.drain(30))
        wait_until(lambda: health_status(app.port) == NOT_SERVING, what="NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(request("new call"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
        assert not draining.done()
        app.scheduler.release_runner()
        assert len(in_flight.result(30).results) == 1
        draining.result(30)
    finally:
        loaded.set()
        if app.scheduler is not None:
            app.scheduler.release_runner()
        loop_thread.run(app.drain(0))


def _answers(port: int) -> bool:
    try:
        health_status(port)
    except grpc.RpcError:
        return False
    return True


def test_reflection_lists_the_service(server: SafetyServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        file = db.FindFileContainingSymbol(SERVICE_NAME)
        methods = {m.name for s in file.service for m in s.method}
        assert {"Classify", "Info"} <= methods


def test_metrics_after_calls(server: SafetyServer, stub: Any) -> None:
    stub.Classify(request("one", "two", "three"), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Classify(pb2.ClassifyRequest(), timeout=10)
    # An aborted call's status reaches the client before the server-side interceptor counts it: poll.
    invalid = 'safety_requests_total{code="INVALID_ARGUMENT",method="Classify"}'
    wait_until(lambda: invalid in scrape(server), what="the INVALID_ARGUMENT call counted")
    text = scrape(server)
    assert metric_value(text, 'safety_requests_total{code="OK",method="Classify"}') >= 1
    assert metric_value(text, invalid) >= 1
    assert metric_value(text, "safety_items_total") >= 3
    assert metric_value(text, "safety_tokens_total") >= 3
    assert metric_value(text, "safety_batch_size_count") >= 1
    assert metric_value(text, "safety_batch_tokens_sum") >= 3
    assert metric_value(text, "safety_queue_wait_seconds_count") >= 3
    assert metric_value(text, "safety_inference_seconds_count") >= 1
    device = metric_value(text, "safety_device_seconds_total")  # the sum of the batches' device times
    assert device > 0 and device == pytest.approx(metric_value(text, "safety_inference_seconds_sum"))
    assert metric_value(text, "safety_graph_replays_total") == 0  # no CUDA graphs on the CPU
    assert metric_value(text, "safety_tokenize_seconds_count") >= 1
    assert metric_value(text, "safety_queue_items") == 0
    assert 'safety_request_duration_seconds_bucket{le="0.005",method="Classify"}' in text


def test_api_key(start_server: Any) -> None:
    app = start_server(api_key="s3cret")
    target = f"127.0.0.1:{app.port}"
    for key in (None, "wrong"):
        with SafetyClient(target, api_key=key) as client, pytest.raises(grpc.RpcError) as err:
            client.classify(["hi"])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in err.value.details()
    with SafetyClient(target, api_key="s3cret") as client:
        assert len(client.classify(["hi"])) == 1
        assert client.info()["labels"]
    stub = pb2_grpc.SafetyClassifierStub(grpc.insecure_channel(target))
    headers = {"bearer s3cret": True, "BEARER s3cret": True, "Basic s3cret": False, "s3cret": False}
    for header, ok in headers.items():  # RFC 7235: the scheme is case-insensitive
        try:
            stub.Info(pb2.InfoRequest(), metadata=[("authorization", header)], timeout=5)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        assert code == (grpc.StatusCode.OK if ok else grpc.StatusCode.UNAUTHENTICATED), header
    assert health_status(app.port) == SERVING  # probes carry no key
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_api_keys_with_whitespace_and_several_of_them(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SAFETY_API_KEY="k1-secret\n" (a Secret made from an echo'd file) used to lock every client out."""
    caplog.set_level(logging.INFO, "safety.service")
    app = start_server(api_key="k1-secret\n, k2-secret")
    ok, refused = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
    codes = {key: answer_code(app.port, key) for key in ("k1-secret", "k2-secret", "k1-secret,k2-secret")}
    assert codes == {"k1-secret": ok, "k2-secret": ok, "k1-secret,k2-secret": refused}
    [serving] = [r for r in caplog.records if r.getMessage() == "serving"]
    assert serving.auth == "API keys from SAFETY_API_KEY (2)" and serving.tls is False
    # the token bound, and what one call may queue (one item within SAFETY_MAX_TEXT_CHARS at worst)
    assert serving.max_queue_tokens == app.scheduler.max_queue_tokens
    assert serving.max_call_tokens == app.classifier.most_tokens(200_000) > serving.max_queue_tokens


def test_a_rotated_key_file_takes_effect_without_a_restart(start_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_text("# current\nk1-secret\n")
    app = start_server(api_key_file=str(path))
    assert answer_code(app.port, "k1-secret") == grpc.StatusCode.OK
    assert answer_code(app.port, "k2-secret") == grpc.StatusCode.UNAUTHENTICATED
    new = tmp_path / "api-keys.new"  # as a Secret volume does: a new file swapped in
    new.write_text("k2-secret\n")
    new.replace(path)
    wait_until(lambda: answer_code(app.port, "k2-secret") == grpc.StatusCode.OK, 10, "the new key")
    assert answer_code(app.port, "k1-secret") == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls(start_server: Any, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    app = start_server(tls_cert=str(cert), tls_key=str(key))
    with SafetyClient(f"localhost:{app.port}", ca=cert, server_name="localhost") as client:
        [result] = client.classify(["over TLS"])
        assert set(result["scores"]) == set(client.info()["labels"])
    with SafetyClient(f"127.0.0.1:{app.port}", timeout=5) as plain, pytest.raises(grpc.RpcError) as err:
        plain.classify(["no TLS"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_bad_tls_pair_is_refused_naming_the_settings_not_the_address(
    loop_thread: Any, self_signed: tuple[Path, Path], tmp_path: Path
) -> None:
    """grpc says only "Failed to bind" for a certificate and key that don't match: we say which files."""
    cert, key = self_signed
    other_key = tmp_path / "other.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-out", str(other_key)],
        check=True, capture_output=True,
    )  # fmt: skip
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cases = {
        (
            cert,
            other_key,
            None,
        ): r"SAFETY_TLS_CERT .*cert.pem, SAFETY_TLS_KEY .*other.pem: not a PEM certificate",
        (key, cert, None): r"SAFETY_TLS_CERT .*key.pem, SAFETY_TLS_KEY .*cert.pem: not a PEM",  # swapped
        (garbage, garbage, None): r"garbage.pem: not a PEM",
        (cert, tmp_path / "missing.pem", None): r"SAFETY_TLS_KEY .*missing.pem: cannot read \(No such file",
        (cert, key, garbage): r"SAFETY_TLS_CLIENT_CA .*garbage.pem: not PEM CA certificates",
        # an empty CA file loads in ssl without a word, and then every client is refused at the handshake
        (cert, key, empty): r"SAFETY_TLS_CLIENT_CA .*empty.pem: holds no certificate",
    }
    for (c, k, ca), message in cases.items():
        with pytest.raises(OSError, match=message) as err:
            load(TlsFiles(str(c), str(k), str(ca) if ca else None))
        assert "bind" not in str(err.value)
    settings = ServeSettings(
        address="127.0.0.1:0", metrics_address=None, tls_cert=str(cert), tls_key=str(other_key)
    )
    with pytest.raises(OSError, match="SAFETY_TLS_CERT"):
        loop_thread.run(create_server(settings, lambda: None))


def test_a_taken_metrics_port_is_refused_naming_the_setting_before_the_model_loads(loop_thread: Any) -> None:
    loaded = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = ServeSettings(address="127.0.0.1:0", metrics_address=address)
        with pytest.raises(
            OSError, match=rf"^SAFETY_METRICS_ADDRESS {address}: cannot bind \(Address already"
        ):
            loop_thread.run(create_server(settings, lambda: loaded.append(1)))
    assert not loaded


@pytest.fixture(scope="module")
def small_queue(start_server: Any) -> SafetyServer:
    return start_server(max_queue_items=8, max_queue_tokens=4096)


def test_deadline_expiring_in_queue_is_never_computed(small_queue: SafetyServer, stub_for: Any) -> None:
    app, stub = small_queue, stub_for(small_queue)
    before = app.scheduler.stats()
    app.scheduler.hold_runner()
    try:
        call = stub.Classify.future(request("this call times out while queued"), timeout=1.0)
        wait_until(lambda: in_queue(app) == 1, what="call queued")
        with pytest.raises(grpc.RpcError) as err:
            call.result(10)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: in_queue(app) == 0, what="expired call dropped")
    finally:
        app.scheduler.release_runner()
    # The runner is free again: a fresh call computes exactly its own window, nothing of the expired one.
    assert len(stub.Classify(request("fresh"), timeout=30).results) == 1
    after = app.scheduler.stats()
    assert after["sequences_run"] - before["sequences_run"] == 1
    text = scrape(app)
    assert (
        sum(
            metric_value(text, f'safety_dropped_windows_total{{reason="{r}"}}')
            for r in ("cancelled", "deadline")
            if f'reason="{r}"' in text
        )
        >= 1
    )


def test_burst_over_admission_bound_is_refused_at_once_while_the_rest_is_served(
    small_queue: SafetyServer, stub_for: Any
) -> None:
    app, stub = small_queue, stub_for(small_queue)
    bound = app.scheduler.max_queue_items
    app.scheduler.hold_runner()  # nothing leaves the queue until the burst has been judged
    try:
        futures = [stub.Classify.future(request(f"burst call {i}"), timeout=30) for i in range(5 * bound)]
        wait_until(lambda: sum(f.done() for f in futures) == 4 * bound, what="excess refused")
        refused = [f for f in futures if f.done()]
        for f in refused:
            assert f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in f.exception().details()
        assert app.scheduler.stats()["queued_items"] == bound
        # still answering other rpcs during the overload
        assert list(stub.Info(pb2.InfoRequest(), timeout=5).labels)
    finally:
        app.scheduler.release_runner()
    admitted = [f for f in futures if f not in refused]
    assert len(admitted) == bound
    for f in admitted:
        assert len(f.result(30).results) == 1
    exhausted = 'safety_requests_total{code="RESOURCE_EXHAUSTED",method="Classify"}'

    def counted() -> bool:
        text = scrape(app)
        return exhausted in text and metric_value(text, exhausted) >= 4 * bound

    wait_until(counted, what="refusals counted")


def test_token_bound_refuses_with_resource_exhausted(
    small_queue: SafetyServer, stub_for: Any, tiny_classifier: Any
) -> None:
    from model import Item

    app, stub = small_queue, stub_for(small_queue)
    big, bound = "the quick brown fox", app.scheduler.max_queue_tokens
    while sum(len(w) for w in tiny_classifier.encode([Item(text=big)])[0].windows) < 0.6 * bound:
        big += " jumps over the lazy dog"
    app.scheduler.hold_runner()
    try:
        first = stub.Classify.future(request(big), timeout=30)
        wait_until(lambda: in_queue(app) == 1, what="first call queued")
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(request(big), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        app.scheduler.release_runner()
    assert first.result(30).results[0].windows >= 1


def test_warm_up_metrics_of_an_eager_server(server: SafetyServer) -> None:
    text = scrape(server)
    assert metric_value(text, "safety_compiled") == 0
    assert metric_value(text, "safety_warmup_seconds") > 0


def test_compiled_server_compiles_before_serving_not_on_requests(
    start_server: Any, tiny_model_dir: Path
) -> None:
    from torch._dynamo.utils import counters

    from model import load_classifier

    app = start_server(classifier=load_classifier(tiny_model_dir, device="cpu", compile=True))
    text = scrape(app)
    assert metric_value(text, "safety_compiled") == 1
    assert metric_value(text, "safety_warmup_seconds") > 0
    graphs = counters["stats"]["unique_graphs"]
    with SafetyClient(f"127.0.0.1:{app.port}") as client:
        results = client.classify(["short", "a longer text " * 40, "x " * 300])
    assert len(results) == 3
    assert counters["stats"]["unique_graphs"] == graphs, "a request compiled a new graph after warm-up"


def test_a_broken_device_takes_the_replica_out_and_serve_exits_1(
    tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sticky CUDA error (simulated: no GPU here) fails the call with UNAVAILABLE and makes `serve()` drain
    (NOT_SERVING first) and return 1, so the orchestrator replaces the replica."""
    import asyncio
    import logging

    from service.server import serve
    from tests.worker.harness import free_port

    def broken(sequences: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiny_classifier, "launch", broken)
    port = free_port()
    settings = ServeSettings(address=f"127.0.0.1:{port}", metrics_address=None, drain_grace_s=5.0)
    seen: dict[str, Any] = {}

    def client() -> None:
        wait_until(lambda: _answers(port) and health_status(port) == SERVING, timeout=30, what="SERVING")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb2_grpc.SafetyClassifierStub(channel)
            try:
                stub.Classify(request("anything"), timeout=10)
            except grpc.RpcError as e:
                seen["code"], seen["details"] = e.code(), e.details()

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    calling = threading.Thread(target=client)
    calling.start()
    try:
        seen["exit"] = asyncio.run(serve(settings, tiny_classifier))
    finally:
        calling.join(30)
        root.handlers[:], root.level = handlers, level
    assert seen["exit"] == 1
    assert seen["code"] == grpc.StatusCode.UNAVAILABLE and "the device failed" in seen["details"]
