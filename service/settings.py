"""Settings of `safety serve`: one dataclass, filled from command-line flags with `SAFETY_*` env fallbacks.

Owns: every knob of the gRPC server, its environment variable, its flag, its default and its validation (a
`ValueError` naming the variable). The field table below is the single source for `safety serve --help` and
the README. Must not know: gRPC, the model's internals; the server receives a finished `ServeSettings`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def _opt_int(value: str) -> int | None:
    return None if value.strip().lower() in ("", "auto", "none") else int(value)


def _opt_str(value: str) -> str | None:
    return value or None


def _setting(default: Any, env: str, parse: Callable[[str], Any], help: str) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse, "help": help})


@dataclass(frozen=True)
class ServeSettings:
    model: str | None = _setting(
        None,
        "SAFETY_MODEL",
        _opt_str,
        "checkpoint directory (config.json, model.safetensors, tokenizer.json); "
        "unset: the bundled default model",
    )
    device: str = _setting("auto", "SAFETY_DEVICE", str, "auto | cpu | cuda | cuda:N")
    dtype: str | None = _setting(
        None,
        "SAFETY_DTYPE",
        _opt_str,
        "float32 | bfloat16 | float16 (unset: float32 on CPU, bfloat16 on CUDA)",
    )
    address: str = _setting(
        "[::]:50051", "SAFETY_ADDRESS", str, "gRPC listen address (health on the same port)"
    )
    max_batch_tokens: int | None = _setting(
        None,
        "SAFETY_MAX_BATCH_TOKENS",
        _opt_int,
        "token budget of one batch (unset: engine default, 16384 on CPU, 131072 on GPU)",
    )
    max_batch_sequences: int | None = _setting(
        None, "SAFETY_MAX_BATCH_SEQUENCES", _opt_int, "sequences (windows) per batch (unset: engine default)"
    )
    max_wait_ms: float = _setting(
        2.0,
        "SAFETY_MAX_WAIT_MS",
        float,
        "longest time an idle device waits for calls being tokenized to fill a batch",
    )
    max_queue_tokens: int | None = _setting(
        None,
        "SAFETY_MAX_QUEUE_TOKENS",
        _opt_int,
        "admission bound on queued tokens; beyond it RESOURCE_EXHAUSTED (unset: 32 x max batch tokens)",
    )
    max_queue_items: int = _setting(
        4096, "SAFETY_MAX_QUEUE_ITEMS", int, "admission bound on queued items (being tokenized or waiting)"
    )
    max_items: int = _setting(256, "SAFETY_MAX_ITEMS", int, "items per Classify request")
    max_text_chars: int = _setting(
        200_000, "SAFETY_MAX_TEXT_CHARS", int, "characters per text (and per context)"
    )
    max_message_bytes: int = _setting(
        64 * 1024 * 1024, "SAFETY_MAX_MESSAGE_BYTES", int, "largest request message accepted, in bytes"
    )
    encode_threads: int = _setting(
        min(4, os.cpu_count() or 1), "SAFETY_ENCODE_THREADS", int, "tokenizer threads (off the event loop)"
    )
    api_key: str | None = _setting(
        None,
        "SAFETY_API_KEY",
        _opt_str,
        "require `authorization: Bearer <key>` on every call except health "
        "checks (prefer the env var: flags show in `ps`)",
    )
    tls_cert: str | None = _setting(None, "SAFETY_TLS_CERT", _opt_str, "PEM certificate chain; enables TLS")
    tls_key: str | None = _setting(None, "SAFETY_TLS_KEY", _opt_str, "PEM private key for --tls-cert")
    metrics_address: str | None = _setting(
        "0.0.0.0:9090",
        "SAFETY_METRICS_ADDRESS",
        _opt_str,
        "Prometheus /metrics HTTP address ('' or off: none)",
    )
    drain_grace_s: float = _setting(
        20.0,
        "SAFETY_DRAIN_GRACE_S",
        float,
        "on SIGTERM: NOT_SERVING, then finish in-flight calls within this",
    )
    log_level: str = _setting("INFO", "SAFETY_LOG_LEVEL", str, "DEBUG | INFO | WARNING | ERROR")
    log_format: str = _setting("json", "SAFETY_LOG_FORMAT", str, "json (one object per line) | text")

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> ValueError:
            return ValueError(f"{_env(name)}: {message}")

        positive = ("max_queue_items", "max_items", "max_text_chars", "max_message_bytes", "encode_threads")
        for name in (*positive, "max_batch_tokens", "max_batch_sequences", "max_queue_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise bad(name, f"must be a positive integer, got {value}")
        if self.max_wait_ms < 0:
            raise bad("max_wait_ms", f"must be >= 0, got {self.max_wait_ms}")
        if self.drain_grace_s < 0:
            raise bad("drain_grace_s", f"must be >= 0, got {self.drain_grace_s}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise bad("tls_cert", "TLS needs both SAFETY_TLS_CERT and SAFETY_TLS_KEY")
        if self.log_format not in ("json", "text"):
            raise bad("log_format", f"must be json or text, got {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise bad("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.metrics_address and self.metrics_address.lower() == "off":
            object.__setattr__(self, "metrics_address", None)
        for name in ("address", "metrics_address"):
            value = getattr(self, name)
            if value and not split_address(value)[1].isdigit():
                raise bad(name, f"must be HOST:PORT, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from `SAFETY_*` variables (unset or empty: the default), then explicit overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                try:
                    values[f.name] = f.metadata["parse"](raw)
                except ValueError:
                    raise ValueError(f"{f.metadata['env']}: cannot parse {raw!r}") from None
        values.update(overrides)
        return cls(**values)


DEST_PREFIX = "setting_"


def _env(name: str) -> str:
    return next(f.metadata["env"] for f in fields(ServeSettings) if f.name == name)


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
            "--" + f.name.replace("_", "-"),
            dest=DEST_PREFIX + f.name,  # own namespace: `safety --log-level` also exists
            type=f.metadata["parse"],
            default=None,
            metavar=f.name.split("_")[-1].upper(),
            help=f"{f.metadata['help']} [env {env}; default {default}]",
        )


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Flags override `SAFETY_*` variables, which override defaults."""
    given = {f.name: getattr(args, DEST_PREFIX + f.name, None) for f in fields(ServeSettings)}
    overrides = {name: value for name, value in given.items() if value is not None}
    return ServeSettings.from_env(environ, **overrides)
