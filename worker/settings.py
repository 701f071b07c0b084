"""Settings of the batch side (`safety worker`, `safety submit`, `safety job`, and the service's job client).

Owns: every `SAFETY_*` variable the worker and the job client read beyond the engine's ones (this dataclass
extends model/engine_settings.py's), its default and its validation (a `ConfigError` naming the variable),
and `redacted_url`, the one way a Redis URL is put into a message or a log (its credentials masked).
The field table is the single source for docs/jobs.md; the field factory and the reading of the environment
are model/settings_base.py's. Must not know: Celery, Redis, torch; `worker.app`, `worker.tasks` and
`worker.jobs` receive a finished `WorkerSettings`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from model.engine_settings import EngineSettings
from model.errors import ConfigError
from model.settings_base import env_name as _env_name
from model.settings_base import opt_int, setting, values_from_env


@dataclass(frozen=True)
class WorkerSettings(EngineSettings):
    """The engine's settings (model/engine_settings.py), then the batch side's own."""

    redis_url: str = setting(
        "redis://localhost:6379/0", "SAFETY_REDIS_URL", str, "Redis for the Celery broker and the job store"
    )
    queue: str = setting("safety.classify", "SAFETY_QUEUE", str, "the dedicated Celery queue of chunk tasks")
    chunk_size: int = setting(256, "SAFETY_CHUNK_SIZE", int, "items per chunk (one chunk = one task)")
    result_ttl_s: int = setting(
        604_800, "SAFETY_RESULT_TTL_S", int, "seconds a job and its results are kept (from submission, "
        "then again from the moment it finishes)"
    )  # fmt: skip
    max_attempts: int = setting(
        3, "SAFETY_MAX_ATTEMPTS", int, "deliveries of one chunk before its items are marked failed and the "
        "chunk goes to the dead-letter list"
    )  # fmt: skip
    visibility_timeout_s: int = setting(
        3600, "SAFETY_VISIBILITY_TIMEOUT_S", int, "seconds before an unacknowledged chunk (its worker died) "
        "is delivered again; a live worker renews its hold before each slice of the chunk, so it must exceed "
        "the longest slice, not the longest chunk"
    )  # fmt: skip
    concurrency: int | None = setting(
        None, "SAFETY_WORKER_CONCURRENCY", opt_int, "worker processes per `safety worker` (unset: 1; the "
        "solo pool on CUDA always runs one)"
    )  # fmt: skip
    drain_grace_s: float = setting(
        20.0, "SAFETY_DRAIN_GRACE_S", float, "on SIGTERM: seconds to finish the running chunk before it is "
        "handed back to the queue"
    )  # fmt: skip
    log_level: str = setting("INFO", "SAFETY_LOG_LEVEL", str, "DEBUG | INFO | WARNING | ERROR")
    log_format: str = setting(
        "text", "SAFETY_LOG_FORMAT", str, "text (Celery's own lines) | json (one object per line, no banner)"
    )
    metrics_port: int = setting(
        9101, "SAFETY_WORKER_METRICS_PORT", int, "Prometheus /metrics port of `safety worker` (0: none)"
    )

    @staticmethod
    def bad(name: str, message: str) -> Exception:
        return _bad(name, message)

    def __repr__(self) -> str:
        """The dataclass's repr with the Redis URL redacted (`redacted_url`): settings in a log line, a
        traceback's locals or an error report must not carry its password."""
        shown = (
            f"{f.name}={redacted_url(self.redis_url) if f.name == 'redis_url' else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"{type(self).__name__}({', '.join(shown)})"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("chunk_size", "result_ttl_s", "max_attempts", "visibility_timeout_s", "concurrency"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise _bad(name, f"must be a positive integer, got {value!r}")
        if isinstance(self.metrics_port, bool) or not 0 <= self.metrics_port <= 65535:
            raise _bad("metrics_port", f"must be a port number (0: none), got {self.metrics_port!r}")
        if not (math.isfinite(self.drain_grace_s) and self.drain_grace_s >= 0):
            raise _bad("drain_grace_s", f"must be a finite number >= 0, got {self.drain_grace_s}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            got = redacted_url(self.redis_url)
            shown = repr(got) if "://" in got else "a value without a scheme (not shown: it may be a secret)"
            raise _bad("redis_url", f"must be a redis://, rediss:// or unix:// URL, got {shown}")
        problem = redis_url_problem(self.redis_url)
        if problem:
            raise _bad("redis_url", problem)
        if not self.queue or any(c.isspace() for c in self.queue):
            raise _bad("queue", f"must be a non-empty name without spaces, got {self.queue!r}")
        if self.log_format not in ("json", "text"):
            raise _bad("log_format", f"must be json or text, got {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise _bad("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from `SAFETY_*` variables (unset or empty: the default), and explicit overrides, which
        win: the variable of an overridden setting is not read (nor refused if it would not parse)."""
        values = values_from_env(cls, environ, _bad, skip=overrides.keys())
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> WorkerSettings:
        return replace(self, **overrides)


MASK = "***"
PERCENT_ENCODE = "percent-encode any '/', '#', '?', '@' or ':' in the user name or password (e.g. '/' as %2F)"


def redacted_url(url: str) -> str:
    """`url` as a message or a log may show it: whatever comes before its last '@' after the scheme (the
    user and password, however many '@', ':' or '/' the password holds), every query-string value (redis-py
    reads a password from the query, under whatever spelling of the key) and any fragment replaced by `***`;
    query keys are kept. A value without a scheme is not a URL, and may be a password set in the wrong
    place: all of it is `***`.

    "redis://user:s3cr@t@host:6379/0" -> "redis://***@host:6379/0";
    "unix:///run/redis.sock?db=0&password=x" -> "unix:///run/redis.sock?db=***&password=***"."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return MASK
    _, at, host = rest.rpartition("@")
    if at:
        rest = f"{MASK}@{host}"
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    if question:
        parts = (p.partition("=") for p in query.split("&"))
        rest += "?" + "&".join(f"{key}={MASK}" if eq else (MASK if key else "") for key, eq, _ in parts)
    if hash_:
        rest += "#" + (MASK if fragment else "")
    return f"{scheme}://{rest}"


def redis_url_problem(url: str) -> str | None:
    """Why redis-py or Celery's broker (kombu) would misread or refuse `url` (a redis://, rediss:// or
    unix:// URL), or None. Both split the URL with the standard rules: the user and password end at the
    first '/', '#' or '?', so a password holding one of them turns into a port that is not a number
    (`ValueError` on every connection) or, worse, into a path; and kombu fails (TypeError) on a password
    given in the query as well. The message shows the URL only through `redacted_url`."""
    shown = repr(redacted_url(url))
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parses the port: ValueError if it is not a number in range
        parts.hostname  # noqa: B018
    except ValueError:
        return f"is not a URL redis-py can read ({shown}): {PERCENT_ENCODE}"
    if "@" in parts.path + parts.query + parts.fragment:
        return f"has an '@' after its first '/', '#' or '?' ({shown}): {PERCENT_ENCODE}"
    if any(unquote(key).lower() == "password" for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return (
            f"has a password in its query ({shown}), which Celery's broker cannot use: put it in the URL's "
            f"user info instead (redis://user:password@host:6379/0), and {PERCENT_ENCODE}"
        )
    return None


def env_name(name: str) -> str:
    return _env_name(WorkerSettings, name)


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting, in declaration order (docs/jobs.md)."""
    return [(f.metadata["env"], repr(f.default), f.metadata["help"]) for f in fields(WorkerSettings)]


def _bad(name: str, message: str) -> ConfigError:
    return ConfigError(message, field=env_name(name), file="environment")
