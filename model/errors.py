"""The one error hierarchy of safety-classifier.

Owns: every exception type the product raises on purpose, and `device_failed(exc)`, which tells a foreign
error that broke the device for good from one that only failed a batch. `service/errors.py` maps these classes
to gRPC status codes in a single table; the worker records their messages on failed items. Must not know:
gRPC, Celery or HTTP — these are plain Python exceptions with fields a front end can report.
"""

from __future__ import annotations


class SafetyError(Exception):
    """Base class of every deliberate error."""


class InvalidInputError(SafetyError, ValueError):
    """Bad caller input. `index` is the item's position in the request (None for request-level fields);
    `field` names the offending field (e.g. "text", "role", "thresholds.hate"), or is "" when the item
    itself is wrong (`items[3]: must be an object`). A size over a limit also says which, for programs:
    `limit` (the largest accepted), `value` (what was sent) and `setting` (the variable that sets it)."""

    def __init__(
        self,
        message: str,
        *,
        field: str,
        index: int | None = None,
        limit: int | None = None,
        value: int | None = None,
        setting: str = "",
    ) -> None:
        self.field = field
        self.index = index
        self.limit, self.value, self.setting = limit, value, setting
        self.reason = message  # what is wrong, without where
        item = f"items[{index}]"
        where = field if index is None else f"{item}.{field}" if field else item
        self.where = where
        super().__init__(f"{where}: {message}")


class ConfigError(SafetyError, ValueError):
    """A bad or missing field in a checkpoint's config.json (or another config file)."""

    def __init__(self, message: str, *, field: str, file: str) -> None:
        self.field = field
        self.file = file
        super().__init__(f"{file}: field '{field}': {message}")


class CheckpointError(SafetyError):
    """A checkpoint directory that cannot be loaded: missing or corrupt files, mismatched tensors."""


class ModelNotFoundError(CheckpointError):
    """No model path was given and no bundled default model exists."""


class OverloadedError(SafetyError):
    """Admission refused: the queue is at its token or item bound. Retry later with backoff; `retry_after_ms`,
    when known, is how long the refusing component expects to need before a retry can be admitted."""

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        self.retry_after_ms = retry_after_ms
        super().__init__(message)


class TooManyCallsError(OverloadedError):
    """Admission refused before the queue: the server's cap on calls (or health watches) open at once is
    reached. Told apart from a full queue, so that a client can tell a leak of open calls or streams from
    load."""


class DeadlineExceededError(SafetyError):
    """The caller's deadline passed before the work was computed."""


class UnavailableError(SafetyError):
    """The component is not ready, is draining, or a backing store (Redis) cannot be reached. The
    subclasses below say which, for callers that act on it (service/errors.py's reasons); this class itself
    is a backing store or resource the call needs."""


class ModelLoadingError(UnavailableError):
    """The model is still loading (or warming up): retry shortly."""


class ShuttingDownError(UnavailableError):
    """The server is draining or shutting down: retry on another replica."""


class DeviceFailedError(UnavailableError):
    """The device failed for good: this replica is being replaced; retry on another."""


class JobBusyError(UnavailableError):
    """Another caller holds the job for now (another process is submitting it): retry once it is done, which
    resumes the job; the message says how long a caller that died would hold it. `retry_after_ms`: how long
    the holder's submit lease has left (a submit that died frees the job by then), sent as gRPC's retry hint
    as OverloadedError's is."""

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        self.retry_after_ms = retry_after_ms
        super().__init__(message)


class NotFoundError(SafetyError):
    """A named object (e.g. a job id) does not exist or has expired."""


class FailedPreconditionError(SafetyError):
    """The named object is not in a state that allows the call, and waiting will not change that: e.g. a job
    whose submission stopped half-way (resume the submit first). The message says what to do."""


class UnauthenticatedError(SafetyError):
    """Missing or wrong credentials."""


class UnsupportedError(SafetyError):
    """A feature this installation does not offer, e.g. the jobs API on a server installed without the
    worker extra (celery, redis)."""


# Messages of errors after which a CUDA context stays broken ("sticky" errors): every later call fails too.
STICKY_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS_EXECUTION_FAILED", "unspecified launch failure",
                        "illegal memory access", "device-side assert")  # fmt: skip


def device_failed(exc: BaseException) -> bool:
    """True for an error that leaves this process's device unusable (an illegal memory access, a device-side
    assert, a lost GPU: CUDA reports them as sticky errors, so every later kernel fails as well): the process
    must be replaced, not the batch retried. Out-of-memory is not one (a smaller batch may fit). Told by class
    name (torch's `AcceleratorError`, `OutOfMemoryError`) so that this module needs no torch."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OutOfMemoryError" in names:
        return False
    if "AcceleratorError" in names:  # torch >= 2.8: a CUDA runtime error
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in STICKY_DEVICE_ERRORS)
