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
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("safety.service")

Signature = tuple[tuple[int, int, int, int] | None, ...]


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
    try:  # password=b"": an encrypted key fails here instead of prompting on the terminal
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as e:
        raise OSError(
            f"SAFETY_TLS_CERT {cert}, SAFETY_TLS_KEY {key}: not a PEM certificate chain and the unencrypted "
            f"private key that matches it ({e.reason or e})"
        ) from None
    if files.client_ca:
        try:
            ssl.create_default_context(cadata=pem["SAFETY_TLS_CLIENT_CA"].decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise OSError(
                f"SAFETY_TLS_CLIENT_CA {files.client_ca}: not PEM CA certificates ({reason})"
            ) from None
    return grpc.ssl_server_certificate_configuration(
        [(pem["SAFETY_TLS_KEY"], pem["SAFETY_TLS_CERT"])], pem.get("SAFETY_TLS_CLIENT_CA")
    )


def _signature(files: TlsFiles) -> Signature:
    out = []
    for _, path in files.named():
        try:
            st = os.stat(path)  # follows symlinks: a Secret volume's ..data swap changes the inode
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(out)


class ReloadingCredentials:
    """Server credentials whose certificate, key and client CA follow their files. Construction loads them
    (OSError naming the file when they don't load); `credentials()` is what `add_secure_port` takes."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._signature = _signature(files)
        self._config = load(files)
        self._fresh = False  # a re-read configuration grpc has not been handed yet
        self.reloads = 0

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
            self.reloads += 1
        log.info("TLS files re-read", extra={"files": dict(self.files.named())})
        return True


def tls_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """Server credentials from PEM files, checked first, re-read when they change (`ReloadingCredentials`)."""
    return ReloadingCredentials(TlsFiles(cert, key, client_ca)).credentials()
