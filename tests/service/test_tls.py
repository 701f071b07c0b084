"""TLS of the served port against real servers on port 0 and certificates made here with openssl: mutual TLS
(SAFETY_TLS_CLIENT_CA) refuses clients without a certificate from that CA at the handshake, and certificate,
key and client CA are re-read when their files change, without a restart."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.client import SafetyClient
from service.settings import ServeSettings
from tests.service.helpers import wait_until
from tests.service.pki import make_ca, make_leaf, served_serial, speaks_http2
from tests.service.processes import safety_command

Pair = tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    d = tmp_path_factory.mktemp("pki")
    ca, foreign = make_ca(d, "ca"), make_ca(d, "foreign-ca")
    return {
        "ca": ca,
        "foreign": foreign,
        "server": make_leaf(d, "server", ca, serial=1001),
        "server2": make_leaf(d, "server2", ca, serial=2002),
        "client": make_leaf(d, "client", ca, serial=3003),
        "intruder": make_leaf(d, "intruder", foreign, serial=4004),
    }


def classify_code(port: int, pki: dict[str, Pair], client: Pair | None) -> grpc.StatusCode:
    cert, key = client if client is not None else (None, None)
    with SafetyClient(
        f"localhost:{port}", ca=pki["ca"][0], cert=cert, key=key, server_name="localhost", timeout=10
    ) as c:
        try:
            c.classify(["over mutual TLS"])
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_client_ca_needs_a_server_certificate() -> None:
    with pytest.raises(ValueError, match="SAFETY_TLS_CLIENT_CA: mutual TLS needs SAFETY_TLS_CERT"):
        ServeSettings.from_env({"SAFETY_TLS_CLIENT_CA": "/ca.pem"})


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    start_server: Any, pki: dict[str, Pair]
) -> None:
    cert, key = pki["server"]
    app = start_server(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki["ca"][0]))
    assert classify_code(app.port, pki, pki["client"]) == grpc.StatusCode.OK
    assert classify_code(app.port, pki, None) == grpc.StatusCode.UNAVAILABLE
    assert classify_code(app.port, pki, pki["intruder"]) == grpc.StatusCode.UNAVAILABLE
    # refused at the handshake, before any call reaches the server
    ca = pki["ca"][0]
    assert speaks_http2(app.port, ca, pki["client"])
    assert not speaks_http2(app.port, ca)
    assert not speaks_http2(app.port, ca, pki["intruder"])


def test_certificates_are_re_read_when_their_files_change(
    start_server: Any, pki: dict[str, Pair], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki["server"][0], cert)
    shutil.copy(pki["server"][1], key)
    app = start_server(tls_cert=str(cert), tls_key=str(key))
    ca = pki["ca"][0]
    assert served_serial(app.port, ca) == 1001

    # A certificate that does not match the key in place (half a rotation): the old pair stays, a warning
    # names the file.
    with caplog.at_level(logging.WARNING, logger="safety.service"):
        staged = tmp_path / "staged.crt"
        shutil.copy(pki["server2"][0], staged)
        os.replace(staged, cert)
        assert served_serial(app.port, ca) == 1001
        wait_until(lambda: any("tls.crt" in r.getMessage() for r in caplog.records), what="a warning")
    warning = next(r for r in caplog.records if "tls.crt" in r.getMessage())
    assert warning.levelno == logging.WARNING and "keeping the certificate in use" in warning.getMessage()

    # The key follows: new connections get the new certificate, without a restart.
    staged = tmp_path / "staged.key"
    shutil.copy(pki["server2"][1], staged)
    os.replace(staged, key)
    serials: list[int] = []
    wait_until(lambda: serials.append(served_serial(app.port, ca)) or serials[-1] == 2002, what="serial 2002")
    assert classify_code(app.port, pki, None) == grpc.StatusCode.OK


def test_classify_remote_with_a_client_certificate(start_server: Any, pki: dict[str, Pair]) -> None:
    cert, key = pki["server"]
    app = start_server(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki["ca"][0]))
    base = [*safety_command(), "classify", "--remote", f"localhost:{app.port}", "--ca", str(pki["ca"][0])]
    client = ["--client-cert", str(pki["client"][0]), "--client-key", str(pki["client"][1])]
    ok = subprocess.run([*base, *client, "hello"], capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["scores"]
    refused = subprocess.run(
        [*base, "--tls", "hello"], capture_output=True, text=True, timeout=120, check=False
    )
    assert refused.returncode != 0 and "UNAVAILABLE" in refused.stderr


def test_classify_remote_without_tls_to_a_tls_port_is_told_to_pass_tls(
    start_server: Any, pki: dict[str, Pair]
):
    """It printed only gRPC's `failed to connect to all addresses; ... Socket closed`."""
    from service.cli import remote_classify

    cert, key = pki["server"]
    app = start_server(tls_cert=str(cert), tls_key=str(key))
    target = f"localhost:{app.port}"
    with pytest.raises(SystemExit) as e:
        list(remote_classify(target, ["hello"], timeout=10))
    said = str(e.value.code)
    assert said.startswith(f"safety classify --remote {target}: UNAVAILABLE: failed to connect"), said
    assert said.endswith(f" (does {target} serve TLS? then pass --tls, and --ca FILE for a private CA)"), said
    [result] = remote_classify(target, ["hello"], tls=True, ca=str(pki["ca"][0]), timeout=10)
    assert result["scores"]


def test_a_rotated_client_ca_is_trusted_instead_of_the_old_one(
    start_server: Any, pki: dict[str, Pair], tmp_path: Path
) -> None:
    """SAFETY_TLS_CLIENT_CA replaced by another CA (a renamed file, as a Secret update does): from the next
    handshake on, clients with a certificate from the new CA are accepted and those of the old one refused,
    without a restart."""
    client_ca = tmp_path / "client-ca.pem"
    shutil.copy(pki["ca"][0], client_ca)
    cert, key = pki["server"]
    app = start_server(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(client_ca))
    server_ca = pki["ca"][0]  # the server's own certificate does not change
    old_client, new_client = pki["client"], pki["intruder"]  # signed by "ca", by "foreign-ca"
    assert speaks_http2(app.port, server_ca, old_client)
    assert not speaks_http2(app.port, server_ca, new_client)

    staged = tmp_path / "staged.pem"
    shutil.copy(pki["foreign"][0], staged)
    os.replace(staged, client_ca)
    wait_until(lambda: speaks_http2(app.port, server_ca, new_client), what="the new CA's client accepted")
    assert not speaks_http2(app.port, server_ca, old_client)
    assert not speaks_http2(app.port, server_ca)
    assert classify_code(app.port, pki, new_client) == grpc.StatusCode.OK
    assert classify_code(app.port, pki, old_client) == grpc.StatusCode.UNAVAILABLE
