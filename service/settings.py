"""Settings of `safety serve`: one dataclass, filled from command-line flags with `SAFETY_*` env fallbacks.

Owns: every knob of the gRPC server, its environment variable, its flag, its default and its validation (an
`InvalidInputError`, a ValueError, naming the variable, or the flag when a flag gave the value: `from_args`;
an API key file is read once here to check it, service/apikeys.py owns its syntax). The field table below is
the single source for `safety serve --help` and the README. The field factory and the reading of the
environment are model/settings_base.py's. Must not know: gRPC, the model's internals; the server receives a
finished `ServeSettings`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from model.engine_settings import EngineSettings
from model.errors import InvalidInputError
from model.settings_base import env_name, expects, opt_int, opt_str, setting, values_from_env
from model.threads import available_cpus
from service.apikeys import parse_keys, read_key_file

# SAFETY_ACCESS_LOG: no access log, a line for each call that did not end OK, or a line for every call.
ACCESS_LOG_MODES = ("off", "errors", "all")


@dataclass(frozen=True)
class ServeSettings(EngineSettings):
    """The engine's settings (model/engine_settings.py), then the server's own."""

    address: str = setting(
        "[::]:50051", "SAFETY_ADDRESS", str, "gRPC listen address (health on the same port)"
    )
    max_wait_ms: float = setting(
        2.0,
        "SAFETY_MAX_WAIT_MS",
        float,
        "longest time an idle device waits for calls being tokenized to fill a batch",
    )
    deadline_horizon_ms: float = setting(
        10_000.0,
        "SAFETY_DEADLINE_HORIZON_MS",
        float,
        "batches take queued windows earliest deadline first, a deadline counting as at most this long after "
        "the call was queued and no deadline as exactly that: calls with nearer deadlines go first, yet none "
        "waits behind later arrivals once this has passed (0: arrival order)",
    )
    max_queue_tokens: int | None = setting(
        None,
        "SAFETY_MAX_QUEUE_TOKENS",
        opt_int,
        "admission bound on queued tokens; beyond it RESOURCE_EXHAUSTED (unset: 32 x max batch tokens). One "
        "call may be larger, up to the most tokens one item within the max text chars can make (4 a "
        "character, in windows): it is queued while the queue is below the bound",
    )
    max_queue_items: int = setting(
        4096, "SAFETY_MAX_QUEUE_ITEMS", int, "admission bound on queued items (being tokenized or waiting)"
    )
    max_items: int = setting(256, "SAFETY_MAX_ITEMS", int, "items per Classify request")
    max_stream_inflight: int = setting(
        64,
        "SAFETY_MAX_STREAM_INFLIGHT",
        int,
        "requests of one ClassifyStream classified at once; beyond it the server stops reading that stream "
        "until its oldest response is sent (HTTP/2 flow control pushes back on the client)",
    )
    max_message_bytes: int = setting(
        64 * 1024 * 1024,
        "SAFETY_MAX_MESSAGE_BYTES",
        int,
        "largest request message accepted, in bytes (larger: INVALID_ARGUMENT)",
    )
    max_job_items: int = setting(
        100_000,
        "SAFETY_MAX_JOB_ITEMS",
        int,
        "items per SubmitJob request (larger sets: several jobs, or `safety submit`, which streams a JSONL "
        "file of any size to Redis)",
    )
    max_concurrent_rpcs: int = setting(
        8192,
        "SAFETY_MAX_CONCURRENT_RPCS",
        int,
        "calls open at once (streams, job RPCs and reflection included; health checks and health watches "
        "not); beyond it a new call is refused at once, its request unread, with RESOURCE_EXHAUSTED and a "
        "retry hint, counted in safety_requests_total",
    )
    max_health_watches: int = setting(
        64,
        "SAFETY_MAX_HEALTH_WATCHES",
        int,
        "grpc.health.v1.Health/Watch streams open at once (they need no API key and never end), apart from "
        "SAFETY_MAX_CONCURRENT_RPCS; beyond it a new Watch is refused with RESOURCE_EXHAUSTED. Health/Check "
        "is never capped",
    )
    max_connection_idle_s: int = setting(
        600,
        "SAFETY_MAX_CONNECTION_IDLE_S",
        int,
        "a connection without an open call for this long is closed (GOAWAY; a client reconnects on its next "
        "call); 0: never",
    )
    max_connection_age_s: int = setting(
        300,
        "SAFETY_MAX_CONNECTION_AGE_S",
        int,
        "a connection this old (plus or minus 10 percent) takes no new calls (GOAWAY: the client's next call "
        "opens a new one, possibly to another replica); calls open on it, streams included, are never cut by "
        "this; 0: never",
    )
    encode_threads: int = setting(
        # the CPUs this process may use (affinity, cgroup quota = a Kubernetes CPU limit), not the node's
        min(4, available_cpus()),
        "SAFETY_ENCODE_THREADS",
        int,
        "tokenizer threads (off the event loop)",
    )
    api_key: str | None = setting(
        None,
        "SAFETY_API_KEY",
        opt_str,
        "require `authorization: Bearer <key>` on every call except health checks; several keys separated "
        "by commas are each accepted (rotation), surrounding ASCII whitespace is stripped, each must be "
        "printable ASCII (a shorter key than 16 characters is accepted with a warning; prefer the env var: "
        "flags show in `ps`)",
    )
    api_key_file: str | None = setting(
        None,
        "SAFETY_API_KEY_FILE",
        opt_str,
        "file of API keys instead of SAFETY_API_KEY: one per line, blank lines and '#' comments ignored; "
        "re-read within about a second of a change (a Kubernetes Secret volume rotates keys without a "
        "restart); if it becomes unreadable or empty, the keys read before stay",
    )
    tls_cert: str | None = setting(None, "SAFETY_TLS_CERT", opt_str, "PEM certificate chain; enables TLS")
    tls_key: str | None = setting(None, "SAFETY_TLS_KEY", opt_str, "PEM private key for --tls-cert")
    tls_client_ca: str | None = setting(
        None,
        "SAFETY_TLS_CLIENT_CA",
        opt_str,
        "PEM CA certificate(s); clients must present a certificate it signed (mutual TLS; needs --tls-cert)",
    )
    metrics_address: str | None = setting(
        "0.0.0.0:9090",
        "SAFETY_METRICS_ADDRESS",
        opt_str,
        "Prometheus /metrics HTTP address (off: none; empty, like every setting: the default)",
    )
    drain_grace_s: float = setting(
        20.0,
        "SAFETY_DRAIN_GRACE_S",
        float,
        "on SIGTERM: NOT_SERVING, then finish in-flight calls within this",
    )
    log_level: str = setting("INFO", "SAFETY_LOG_LEVEL", str, "DEBUG | INFO | WARNING | ERROR")
    log_format: str = setting("json", "SAFETY_LOG_FORMAT", str, "json (one object per line) | text")
    access_log: str = setting(
        "off", "SAFETY_ACCESS_LOG", str, "off | errors (a log line for each call that did not end OK) | all "
        "(a line for every call): method, code, ms, peer and request_id, on the safety.access logger"
    )  # fmt: skip
    access_log_rate: float = setting(
        100.0, "SAFETY_ACCESS_LOG_RATE", float, "the most access-log lines a second for calls that did not "
        "end OK, in bursts of a second's worth (at least one); the rest are counted by code and summarised "
        "in one warning at most once a second: before the next line written, else a second after the "
        "first of them, and at the drain (0: no limit). Lines of calls that ended OK are never limited"
    )  # fmt: skip

    @staticmethod
    def bad(name: str, message: str) -> Exception:
        return _bad(name, message)

    @classmethod
    def named(cls, name: str) -> str:
        """Both ways to set `name`, for an error found after the settings were made (which one set it is
        not kept): "--model or SAFETY_MODEL"."""
        return f"{flag_name(name)} or {env_name(cls, name)}"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("max_queue_items", "max_items", "max_message_bytes", "encode_threads", "max_queue_tokens",
                    "max_stream_inflight", "max_job_items", "max_concurrent_rpcs",
                    "max_health_watches")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise _bad(name, f"must be a positive integer, got {value}")
        for name in ("max_connection_idle_s", "max_connection_age_s"):  # gRPC takes milliseconds in an int32
            value = getattr(self, name)
            if not 0 <= value <= MAX_CONNECTION_S:
                raise _bad(name, f"must be 0 (never) to {MAX_CONNECTION_S} seconds, got {value}")
        for name in ("max_wait_ms", "deadline_horizon_ms", "drain_grace_s", "access_log_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # nan >= 0 is False, but so is nan < 0
                raise _bad(name, f"must be a finite number >= 0, got {value}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise _bad(
                "tls_cert", "TLS needs both SAFETY_TLS_CERT and SAFETY_TLS_KEY (--tls-cert, --tls-key)"
            )
        if self.tls_client_ca and not self.tls_cert:
            why = "mutual TLS needs SAFETY_TLS_CERT and SAFETY_TLS_KEY as well (--tls-cert, --tls-key)"
            raise _bad("tls_client_ca", why)
        if self.log_format not in ("json", "text"):
            raise _bad("log_format", f"must be json or text, got {self.log_format!r}")
        if self.access_log not in ACCESS_LOG_MODES:
            raise _bad("access_log", f"must be off, errors or all, got {self.access_log!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise _bad("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.api_key is not None and self.api_key_file is not None:
            why = "set either SAFETY_API_KEY or SAFETY_API_KEY_FILE (--api-key, --api-key-file), not both"
            raise _bad("api_key", why)
        if self.api_key is not None:
            try:  # normalised: the stripped keys, comma-separated
                object.__setattr__(self, "api_key", ",".join(parse_keys(self.api_key)))
            except ValueError as e:
                raise _bad("api_key", f"{e} (keys are separated by commas)") from None
        if self.api_key_file is not None:
            try:
                read_key_file(self.api_key_file)
            except ValueError as e:
                raise _bad("api_key_file", str(e)) from None
        if self.metrics_address and self.metrics_address.lower() == "off":
            object.__setattr__(self, "metrics_address", None)
        for name in ("address", "metrics_address"):
            value = getattr(self, name)
            port = split_address(value)[1] if value else ""
            if value and not (port.isascii() and port.isdigit() and int(port) <= MAX_PORT):
                raise _bad(name, f"must be HOST:PORT with a port in 0-{MAX_PORT}, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from `SAFETY_*` variables (unset or empty: the default), and explicit overrides, which
        win: the variable of an overridden setting is not read (nor refused if it would not parse)."""
        values = values_from_env(cls, environ, _bad, skip=overrides.keys())
        values.update(overrides)
        return cls(**values)


DEST_PREFIX = "setting_"
MAX_CONNECTION_S = (2**31 - 1) // 1000  # gRPC's connection idle and age options: int32 milliseconds
MAX_PORT = 65535  # grpc and http.server would take a larger number modulo 65536 (99999 -> 34463)


def _bad(name: str, message: str) -> InvalidInputError:
    """An InvalidInputError (a ValueError) naming the setting's variable: "SAFETY_MAX_ITEMS: must be a
    positive integer, got 0"; `from_args` names the flag instead when a flag gave the value."""
    return InvalidInputError(message, field=env_name(ServeSettings, name))


def flag_name(name: str) -> str:
    """The flag of setting `name`: max_items -> --max-items."""
    return "--" + name.replace("_", "-")


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type whose refusal says what it expected ("invalid opt_int value" did not)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot parse {text!r}: expected {expects(parse)}") from None

    return convert


def split_address(address: str) -> tuple[str, str]:
    """'[::]:50051' -> ('[::]', '50051'); '0.0.0.0:9090' -> ('0.0.0.0', '9090')."""
    host, _, port = address.rpartition(":")
    return host, port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting, stored as `setting_<name>` (None when not given: `from_args` then falls back
    to the environment, then to the default shown in --help)."""
    for f in fields(ServeSettings):
        env = f.metadata["env"]
        default = "unset" if f.default is None else f.default
        parser.add_argument(
            flag_name(f.name),
            dest=DEST_PREFIX + f.name,  # own namespace: `safety --log-level` also exists
            type=_flag_type(f.metadata["parse"]),
            default=None,
            metavar=f.name.split("_")[-1].upper(),
            help=f"{f.metadata['help']} [env {env}; default {default}]",
        )


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Flags override `SAFETY_*` variables, which override defaults. A value refused is named the way it was
    given: "--max-items: must be a positive integer, got 0" for a flag, "SAFETY_MAX_ITEMS: ..." for the
    variable. The variable of a setting a flag gives is not read: one that would not parse
    (`--max-items 5` with SAFETY_MAX_ITEMS=abc) is ignored like any other value there, not reported (the
    server runs with the flag's value, so the variable cannot affect it; refusing to start over it would
    keep a flag from overriding a broken variable)."""
    given = {f.name: getattr(args, DEST_PREFIX + f.name, None) for f in fields(ServeSettings)}
    overrides = {name: value for name, value in given.items() if value is not None}
    try:
        return ServeSettings.from_env(environ, **overrides)
    except InvalidInputError as e:
        flags = {env_name(ServeSettings, name): flag_name(name) for name in overrides}
        if e.field not in flags:
            raise
        raise InvalidInputError(e.reason, field=flags[e.field]) from None
