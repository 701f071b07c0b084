"""Certificates for the TLS tests, made with the openssl command line: CAs, and leaf certificates they sign.

Owns: the openssl invocations (EC P-256 keys, one-day validity, explicit serial numbers so that a test can
tell two certificates apart from the client side). Must not know: gRPC or the server.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


def make_leaf(directory: Path, name: str, ca: tuple[Path, Path], serial: int) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 signed by `ca`, with serial number `serial`: (cert, key)."""
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial",
             str(serial), "-days", "1", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return cert, key


def _context(ca: Path, client: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    return context


def served_serial(port: int, ca: Path, client: tuple[Path, Path] | None = None) -> int:
    """Serial number of the certificate the server on 127.0.0.1:`port` presents to a new connection."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        _context(ca, client).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return int(tls.getpeercert()["serialNumber"], 16)


def speaks_http2(port: int, ca: Path, client: tuple[Path, Path] | None = None) -> bool:
    """Whether the server on 127.0.0.1:`port` completes the TLS handshake with this client and answers its
    HTTP/2 preface. A server that refuses the client certificate ends the handshake with an alert, which TLS
    1.3 delivers on the client's first read."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with _context(ca, client).wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                return bool(tls.recv(9))  # the server's SETTINGS frame
        except (ssl.SSLError, ConnectionResetError):
            return False
