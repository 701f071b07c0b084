"""TLS of the served port: certificate, key and optional client CA from PEM files, re-read when they change.

Owns: reading and checking the files named by SAFETY_TLS_CERT, SAFETY_TLS_KEY and SAFETY_TLS_CLIENT_CA (an
error names the setting and the file), and `ReloadingCredentials`, the certificate-configuration fetcher
grpc calls before every TLS handshake (`grpc.dynamic_ssl_server_credentials`): it stats the files (cheap) and,
when one changed (modification time, size or inode: a Kubernetes Secret update swaps a symlink), re-reads and
checks them all. A new set that does not load (a certificate written before its key, a typo) keeps the one in
use and logs a warning naming the file; the next change is tried again. With a client CA, every client must
present a certificate it signed (mutual TLS), refused at the handshake otherwise. Must not know: the
server's lifecycle, settings parsing, signals.
"""

from __future__ import annotations

import logging
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from service import watch

log = logging.getLogger("safety.service")


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of the served port's TLS; `client_ca` set: mutual TLS."""

    cert: str
    key: str
    client_ca: str | None = None

    def named(self) -> list[tuple[str, str]]:
        """(setting, path) of each file in use."""
        out = [("SAFETY_TLS_CERT", self.cert), ("SAFETY_TLS_KEY", self.key)]
        if self.client_ca:
            out.append(("SAFETY_TLS_CLIENT_CA", self.client_ca))
        return out


def load(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """Read and check the files: grpc reports a bad pair only as "Failed to bind" at start-up, and a bad
    rotated pair only as failed handshakes. Raises OSError naming the setting and the file."""
    pem = {}
    for var, path in files.named():
        try:
            pem[var] = Path(path).read_bytes()
        except OSError as e:
            raise OSError(f"{var} {path}: cannot read ({e.strerror or e})") from None
    cert, key = files.cert, files.key
    try:
        _check_pair(pem["SAFETY_TLS_CERT"], pem["SAFETY_TLS_KEY"])
    except ssl.SSLError as e:
        raise OSError(
            f"SAFETY_TLS_CERT {cert}, SAFETY_TLS_KEY {key}: not a PEM certificate chain and the unencrypted "
            f"private key that matches it ({e.reason or e})"
        ) from None
    if files.client_ca:
        where, client_ca = f"SAFETY_TLS_CLIENT_CA {files.client_ca}", pem["SAFETY_TLS_CLIENT_CA"]
        if not client_ca.strip():  # empty, or caught mid-write: it would lock every client out
            raise OSError(f"{where}: holds no certificate")
        try:  # not create_default_context: it takes the system's CAs when cadata is empty
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise OSError(f"{where}: not PEM CA certificates ({reason})") from None
    return grpc.ssl_server_certificate_configuration(
        [(pem["SAFETY_TLS_KEY"], pem["SAFETY_TLS_CERT"])], pem.get("SAFETY_TLS_CLIENT_CA")
    )


def _check_pair(cert: bytes, key: bytes) -> None:
    """ssl.SSLError unless `cert` is a PEM chain and `key` its unencrypted private key. The bytes grpc will
    get, not the files again (a rotation between two reads could pass a pair grpc never sees); ssl reads
    only files, so they go to a private temporary directory for the check."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        for path, data in zip(paths, (cert, key), strict=True):
            path.touch(mode=0o600)
            path.write_bytes(data)
        # password=b"": an encrypted key fails here instead of prompting on the terminal
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(*paths, password=b"")


def _signature(files: TlsFiles) -> watch.Signature:
    return watch.signature(*(path for _, path in files.named()))


class ReloadingCredentials:
    """Server credentials whose certificate, key and client CA follow their files. Construction loads them
    (OSError naming the file when they don't load); `credentials()` is what `add_secure_port` takes."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._signature = _signature(files)
        self._config = load(files)
        self._fresh = False  # a re-read configuration grpc has not been handed yet

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config, self.fetch, require_client_authentication=bool(self.files.client_ca)
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher, called before every handshake: the new configuration once after a change, else
        None (grpc's "no change"). Never raises: a failure must not fail the handshake with the old files."""
        try:
            self.refresh()
        except Exception:  # logged; the certificate in use stays
            log.exception("re-checking the TLS files failed; keeping the certificate in use")
        with self._lock:
            if not self._fresh:
                return None
            self._fresh = False
            return self._config

    def refresh(self, force: bool = False) -> bool:
        """Re-read the files if they changed since the last try (or `force`); True when a new set loaded
        (used from the next handshake on)."""
        signature = _signature(self.files)
        with self._lock:
            if signature == self._signature and not force:
                return False
            self._signature = signature
            try:
                config = load(self.files)
            except OSError as e:
                log.warning("TLS files changed but do not load; keeping the certificate in use: %s", e)
                return False
            self._config, self._fresh = config, True
        log.info("TLS files re-read", extra={"files": dict(self.files.named())})
        return True
