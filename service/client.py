"""A small Python client for `safety serve`, for gateways: `SafetyClient` (blocking) and
`AsyncSafetyClient` (asyncio), with a per-call deadline, an API key, TLS (mutual TLS with `cert` and
`key`) and retries.

    from service.client import SafetyClient
    with SafetyClient("localhost:50051", api_key="...", timeout=0.5) as client:
        [result] = client.classify(["How do I bake bread?"])
        result["flagged"], result["scores"]["violence"]

Results are plain dicts in the shape of the engine's `Result.to_dict()` (id, scores, logits, flagged,
flagged_labels, tokens, windows, spans), so `safety classify` prints the same JSON locally and remotely.
`classify_stream` sends many requests over one ClassifyStream and yields one dict per request, in order:
its results, or its own error while the stream goes on. `split_requests` cuts any number of items into
Classify requests within a server's per-request limits (`info()["limits"]`) and an estimate of their
tokens (`estimated_tokens`, `request_tokens`); `too_large_as_a_whole(e)` tells a request the server still
finds too large as a whole, to send again as its `halves(request)`; `retry_after_ms(e)` reads a refusal's
retry hint.
Batch jobs (`submit_job`, `get_job`, `stream_job_results`, `cancel_job`, `delete_job`) return the dicts
`safety job status` and `safety job results` print: a job's state and counts, and result lines (a result
plus `index` and `error`).
Retries are gRPC's own (`retry_service_config`): a call that gets UNAVAILABLE (nothing listens yet, the
server is loading or draining) or RESOURCE_EXHAUSTED (its queue is full) goes again, up to `max_attempts`
tries within the call's one deadline, after the server's retry hint (`grpc-retry-pushback-ms`) or a
jittered exponential backoff, while the channel's retry budget lasts. Every method is retried except
DeleteJob (a retry after a lost answer would find the job gone); `submit_job` names the job itself when
the caller does not, so that a retry resumes the job instead of queuing a second one. A call whose
deadline passes while it waits to go again ends DEADLINE_EXCEEDED, not with the error it retried (the
server says "do not retry" when its own hint would outlast the deadline, but an UNAVAILABLE from a
connection that failed has no hint): with sub-second deadlines, where the first error matters more than a
retry, pass `max_attempts=1`.
Errors are `grpc.RpcError`s carrying the server's status code (INVALID_ARGUMENT: fix the input;
RESOURCE_EXHAUSTED / UNAVAILABLE: not got through, after the retries the deadline, the hint and the retry
budget allowed); `error_details(e)` reads their
machine-readable details (the `grpc-status-details-bin` trailer: reason, field path, retry delay), with
googleapis-common-protos installed. Must not know: torch or the model (a gateway installs only grpcio and
protobuf, and googleapis-common-protos for `error_details`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from model.errors import InvalidInputError
from model.items import FIELDS  # torch-free: the item's fields, one definition for every front end
from service import requestid, richstatus
from service.requestid import REQUEST_ID_KEY
from service.richstatus import RETRY_PUSHBACK, ErrorDetails
from service.stubs import pb2, pb2_grpc

ItemLike = str | Mapping[str, Any]
ROLES = {None: pb2.ROLE_UNSPECIFIED, "": pb2.ROLE_UNSPECIFIED, "prompt": pb2.ROLE_PROMPT,
         "response": pb2.ROLE_RESPONSE}  # fmt: skip
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),  # the server accepts pings every 10 s or more
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # reconnect within seconds of a server's return, to keep up with the retries, these and `safety classify
    # --remote`'s (service/retries.py BACKOFF_*; gRPC's default backoff grows to 120 s, and until it ends a
    # call fails at once with the last connection error)
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 4000),
]

# The clients' retries: gRPC's retry policy, in the channel's service config. A call goes again after
# UNAVAILABLE or RESOURCE_EXHAUSTED, at most MAX_ATTEMPTS tries in all (gRPC's ceiling is 5), within the
# call's deadline: after the server's `grpc-retry-pushback-ms` when it sent one (`safety serve` does with
# every RESOURCE_EXHAUSTED and with a busy job's UNAVAILABLE; -1, "do not retry", when that would come too
# close to the call's deadline: service/errors.py `pushback_ms`), else after a backoff that starts at
# RETRY_BACKOFF_S and doubles up to RETRY_BACKOFF_MAX_S, each within 20% at random (gRPC core's jitter):
# about 0.1, 0.2, 0.4 and 0.8 s, 1.5 s over the 5 tries. The channel's retry budget
# (RETRY_TOKENS, RETRY_TOKEN_RATIO: each failed try spends a token, each success earns back a tenth, no
# retries at half or below) stops a client from multiplying its load on a server that keeps failing. gRPC
# keeps up to RETRY_BUFFER_BYTES of a call's request messages to send again; a call that sends more is not
# retried (so a large request is never sent twice, and gRPC's own RESOURCE_EXHAUSTED for a message over the
# server's receive limit, at least 2 MiB with `safety serve`'s SAFETY_MAX_MESSAGE_BYTES of 1 MiB or more
# and 128 MiB by default, is never retried).
MAX_ATTEMPTS = 5
RETRY_BACKOFF_S = 0.1
RETRY_BACKOFF_MAX_S = 2.0
RETRY_TOKENS = 10
RETRY_TOKEN_RATIO = 0.1
RETRY_BUFFER_BYTES = 1024 * 1024
SERVICE = "safety.v1.SafetyClassifier"
# Every method but DeleteJob, whose retry after a lost answer would get NOT_FOUND for the job it deleted.
RETRIED_METHODS = (
    "Classify",
    "ClassifyStream",
    "Info",
    "SubmitJob",
    "GetJob",
    "CancelJob",
    "StreamJobResults",
)


def retry_service_config(max_attempts: int = MAX_ATTEMPTS) -> str:
    """The channel's service config (JSON): `max_attempts` tries of each of RETRIED_METHODS (1 to 5; 1: no
    retry policy, an empty config)."""
    if not 1 <= max_attempts <= 5:
        raise ValueError(f"max_attempts must be 1..5 (gRPC's ceiling), got {max_attempts}")
    if max_attempts == 1:
        return "{}"
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": f"{RETRY_BACKOFF_S}s",
        "maxBackoff": f"{RETRY_BACKOFF_MAX_S}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    config = {
        "methodConfig": [
            {"name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS], "retryPolicy": policy}
        ],
        "retryThrottling": {"maxTokens": RETRY_TOKENS, "tokenRatio": RETRY_TOKEN_RATIO},
    }
    return json.dumps(config)


def build_request(
    items: Iterable[ItemLike], thresholds: Mapping[str, float] | None = None, raw_scores: bool = False
) -> Any:
    """Texts or dicts {id?, text, role? ("prompt" | "response"), context?} -> ClassifyRequest."""
    return pb2.ClassifyRequest(
        items=build_items(items), thresholds=dict(thresholds or {}), raw_scores=raw_scores
    )


def build_items(items: Iterable[ItemLike]) -> list[Any]:
    """Texts or dicts {id?, text, role? ("prompt" | "response"), context?} -> [pb2.Item].

    What a pb2.Item cannot carry raises ValueError naming `items[i].field` before anything is sent (not a
    text or dict, a missing text, an unknown field, a value that is not a string, an unknown role); the
    rest (an empty text, a context on a prompt, the limits) is the server's to refuse, as INVALID_ARGUMENT."""
    return list(iter_items(items))


def iter_items(items: Iterable[ItemLike]) -> Iterator[Any]:
    """`build_items` one item at a time, as `items` yields them."""
    if isinstance(items, str | bytes):  # would be classified character by character
        raise TypeError("items: a list of texts or dicts, not one string (wrap it: [text])")
    for i, item in enumerate(items):
        if isinstance(item, str):
            yield pb2.Item(text=item)
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"items[{i}]: must be a text or a dict, got {type(item).__name__}")
        unknown = sorted(set(item) - set(FIELDS), key=str)
        if unknown:
            raise ValueError(f"items[{i}].{unknown[0]}: unknown field; an item has {', '.join(FIELDS)}")
        if "text" not in item:
            raise ValueError(f"items[{i}].text: is required")
        for name in ("id", "text", "context"):
            value = item.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"items[{i}].{name}: must be a string, got {type(value).__name__}")
        role = item.get("role")
        if not isinstance(role, str | None) or role not in ROLES:
            raise ValueError(f"items[{i}].role: must be 'prompt' or 'response', got {role!r}")
        yield pb2.Item(
            id=item.get("id") or "",
            text=item["text"],
            role=ROLES[role],
            context=item.get("context") or "",
        )


def split_requests(
    items: Iterable[ItemLike], limits: Mapping[str, int], thresholds: Mapping[str, float] | None = None
) -> Iterator[tuple[int, Any]]:
    """Any number of items as consecutive ClassifyRequests, each within a server's per-request limits:
    `limits` as `info()["limits"]` gives them (`max_items`, and `max_queue_items` when lower: a request
    must fit the whole queue; `max_message_bytes`: the serialized request; 0 or missing: no bound), and at
    most `request_tokens(limits)` estimated tokens (`estimated_tokens`; an item estimated at more goes in a
    request of its own). Yields (index of the request's first item, request), reading `items` only as far
    as the request being built.

    An item too large for a request message of its own is an InvalidInputError naming it (`items[i]`); it,
    and any error `items` raises while it is read (a bad line of a file), comes after the request of the
    items before it: those are sent, only what comes after is not."""
    max_items = min((n for n in (limits.get("max_items"), limits.get("max_queue_items")) if n), default=0)
    max_bytes = limits.get("max_message_bytes") or 0
    max_tokens = request_tokens(limits)
    thresholds = dict(thresholds or {})
    base = pb2.ClassifyRequest(thresholds=thresholds).ByteSize()
    batch: list[Any] = []
    first, size, tokens = 0, base, 0

    def pending() -> Iterator[tuple[int, Any]]:
        """The request of the items read since the last one, if any."""
        if batch:
            yield first, pb2.ClassifyRequest(items=batch, thresholds=thresholds)

    source = enumerate(iter_items(items))
    while True:
        try:
            i, item = next(source)
        except StopIteration:
            break
        except Exception:  # the input itself failed: what was read before it still goes
            yield from pending()
            raise
        n = item.ByteSize()
        cost = _ITEM_TAG + _varint_size(n) + n  # what the item adds to the request's serialized size
        if max_bytes and base + cost > max_bytes:
            yield from pending()
            why = (
                f"is {base + cost} bytes as a request message of its own, more than the server's limit "
                f"of {max_bytes} (limits.max_message_bytes, SAFETY_MAX_MESSAGE_BYTES); shorten its text or "
                "context"
            )
            raise InvalidInputError(why, field="", index=i)
        estimate = estimated_tokens(item)
        if batch and (
            (max_items and len(batch) >= max_items)
            or (max_bytes and size + cost > max_bytes)
            or tokens + estimate > max_tokens
        ):
            yield from pending()
            batch, first, size, tokens = [], i, base, 0
        batch.append(item)
        size += cost
        tokens += estimate
    yield from pending()


# Estimated tokens per request, at most (`request_tokens`). The estimate counts a token a character, two to
# four times what a subword tokenizer makes of prose (the scheduler's starting guess is 0.25): 64k estimated
# tokens are some 16k-32k real ones, which a CPU server (about 5k tokens/s) answers in a few seconds, well
# within the default --timeout of 30 s. A request of many such items would run past its deadline there.
REQUEST_TOKENS = 65_536
ITEM_TOKENS = 16  # an item's estimated tokens besides its characters: its windows' special tokens


def new_job_id() -> str:
    """A job id for a SubmitJob whose caller gave none: the server's own form (32 hex digits)."""
    return uuid.uuid4().hex


def estimated_tokens(item: Any) -> int:
    """A generous estimate of the tokens a pb2.Item makes on the server: one a character of its text and
    context, plus ITEM_TOKENS. A tokenizer can make more (bytes of a script it was not trained on, a context
    repeated in every window of a long text): the server refuses a request over its whole queue bound as
    a whole (`too_large_as_a_whole`), and its items go again in smaller requests."""
    return len(item.text) + len(item.context) + ITEM_TOKENS


def request_tokens(limits: Mapping[str, int]) -> int:
    """The estimated tokens `split_requests` puts in one request at most: REQUEST_TOKENS, or half the
    server's whole queue bound (`max_queue_tokens`) when that is lower, so that a request fits the queue
    with room to spare for the estimate's error and for other callers' calls."""
    queue = limits.get("max_queue_tokens") or 0
    return min(REQUEST_TOKENS, queue // 2) if queue else REQUEST_TOKENS


def too_large_as_a_whole(error: grpc.RpcError) -> bool:
    """Did the server refuse the call's request as a whole as too large (INVALID_ARGUMENT naming the field
    `items`: more tokens or items than its whole queue holds, more items than a request may carry)? Its
    items may then pass in smaller requests; an item refused on its own (`items[3].text`) is not one of
    these. The field comes from the error's details (BadRequest), else from the message (`items: ...`)."""
    if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return False
    try:
        details = error_details(error)
    except ValueError:  # a trailer that does not parse: the message still says which field
        details = None
    if details is not None and details.field:
        return details.field == "items"
    return (error.details() or "").startswith("items: ")


def halves(request: Any) -> tuple[Any, Any]:
    """A ClassifyRequest of two or more items as two: its first half of the items and the rest, each with
    the request's other fields (thresholds, raw_scores)."""
    if len(request.items) < 2:
        raise ValueError(f"a request of {len(request.items)} items has no halves")
    cut = len(request.items) // 2
    head, tail = pb2.ClassifyRequest(), pb2.ClassifyRequest()
    head.CopyFrom(request)
    tail.CopyFrom(request)
    del head.items[cut:]
    del tail.items[:cut]
    return head, tail


def retry_after_ms(error: grpc.RpcError) -> int | None:
    """The server's retry hint of a refused call (RESOURCE_EXHAUSTED), in milliseconds: its
    `grpc-retry-pushback-ms` trailer, else the RetryInfo of its details; None when it sent neither. A
    negative trailer (gRPC's "do not retry": `safety serve` sends -1 when the hint runs past the call's
    deadline) defers to the RetryInfo, which still has the hint."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_PUSHBACK:
            try:
                pushback = int(value)
            except ValueError:  # not a number: gRPC's own retry policy ignores it too
                break
            if pushback >= 0:
                return pushback
            break
    try:
        details = error_details(error)
    except ValueError:
        return None
    return details.retry_after_ms if details is not None else None


_ITEM_TAG = 1  # ClassifyRequest.items is field 1, length-delimited: a one-byte tag


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def result_to_dict(result: Any) -> dict[str, Any]:
    """pb2.Result -> the engine's `Result.to_dict()` shape (with `score` read as a probability)."""
    return {
        "id": result.id,
        "scores": {s.label: s.score for s in result.scores},
        "logits": {s.label: s.logit for s in result.scores},
        "flagged": result.flagged,
        "flagged_labels": list(result.flagged_labels),
        "tokens": result.tokens,
        "windows": result.windows,
        "spans": {s.label: [s.span.start, s.span.end] for s in result.scores},
    }


RESULT_KEYS = ("id", "scores", "logits", "flagged", "flagged_labels", "tokens", "windows", "spans")


def _seconds(ts: Any) -> float:
    return ts.seconds + ts.nanos / 1e9


def job_to_dict(job: Any) -> dict[str, Any]:
    """pb2.Job -> the dict `safety job status` prints (state as the worker names it: "queued", "done", ...;
    times in Unix seconds, None while unset)."""
    return {
        "job_id": job.job_id,
        "state": pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "chunks": job.chunks,
        "created_at": _seconds(job.created_at) if job.HasField("created_at") else None,
        "started_at": _seconds(job.started_at) if job.HasField("started_at") else None,
        "finished_at": _seconds(job.finished_at) if job.HasField("finished_at") else None,
        "model": job.model or None,
        "error": job.error or None,
        "finished": job.finished,
    }


def job_result_to_dict(line: Any) -> dict[str, Any]:
    """pb2.JobResult -> a result line as `safety job results` writes it: {index, <result>, error}; a failed
    item has the same keys with None values and the reason in `error`."""
    if line.HasField("result"):
        return {"index": line.index, **result_to_dict(line.result), "error": None}
    return {"index": line.index, **dict.fromkeys(RESULT_KEYS), "id": line.id or None, "error": line.error}


def error_details(error: grpc.RpcError) -> ErrorDetails | None:
    """The machine-readable details of a failed call, from its `grpc-status-details-bin` trailer: `reason`
    (ErrorInfo's, e.g. "INVALID_INPUT", "QUEUE_FULL"; docs/api.md lists them), `domain` ("safety.v1"),
    `metadata` ({"error_id": ...} on INTERNAL), `field` and `description` (INVALID_ARGUMENT: the offending
    field's path, e.g. "items[3].text", and what is wrong with it), `retry_after_ms` (RESOURCE_EXHAUSTED,
    UNAVAILABLE JOB_BUSY: when to retry), besides `code` and `message`. Works on the errors of both clients
    and of plain stubs.

    None when the call carried no details (a server without googleapis-common-protos; an error of gRPC itself,
    such as a deadline that passed on the client) or googleapis-common-protos is not installed here. A
    ValueError when the trailer does not parse or names another status than the call ended with (something
    on the way rewrote the status)."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key != richstatus.STATUS_DETAILS:
            continue
        if not richstatus.available():
            return None
        details = richstatus.unpack(value)
        if details.code != error.code() or details.message != error.details():
            raise ValueError(
                f"{key} holds {details.code.name} {details.message!r}, but the call ended with "
                f"{error.code().name} {error.details()!r}"
            )
        return details
    return None


def stream_response_to_dict(response: Any) -> dict[str, Any]:
    """pb2.ClassifyStreamResponse -> {"sequence", "results" (result dicts, or None), "error" (None, or
    {"status": "RESOURCE_EXHAUSTED", "code": 8, "message": ..., "field": "", "reason": "QUEUE_FULL",
    "retry_after_ms": 120, "metadata": {}}: `field` the offending field's path on INVALID_ARGUMENT, else "";
    `reason` as in `error_details`; `retry_after_ms` None when there is no hint; `metadata` ErrorInfo's: an
    input over a size limit's "limit", "value" and "setting")}."""
    if response.HasField("error"):
        e = response.error
        error = {
            "status": e.status,
            "code": e.code,
            "message": e.message,
            "field": e.field,
            "reason": e.reason,
            "retry_after_ms": e.retry_after_ms or None,
            "metadata": dict(e.metadata),
        }
        return {"sequence": response.sequence, "results": None, "error": error}
    results = [result_to_dict(r) for r in response.response.results]
    return {"sequence": response.sequence, "results": results, "error": None}


def info_to_dict(response: Any) -> dict[str, Any]:
    """pb2.InfoResponse -> dict (labels in logit order; limits with plain ints, not JSON's int64 strings)."""
    limits = response.limits
    return {
        "model": response.model,
        "labels": list(response.labels),
        "thresholds": {label: response.thresholds[label] for label in response.labels},
        "limits": {f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields},
        "device": response.device,
        "dtype": response.dtype,
        "backend": response.backend,
        "version": response.version,
        "multi_label": response.multi_label,
        "compiled": response.compiled,
        "cuda_graphs": response.cuda_graphs,
        "fused_gemm": response.fused_gemm,
        "budget": response.budget,
        "model_revision": response.model_revision,
    }


PemSource = str | Path | bytes | None


def _pem(source: PemSource, field: str, what: str) -> bytes | None:
    """PEM bytes from a file or as given; an unreadable file is an InvalidInputError naming `field`."""
    if not isinstance(source, str | Path):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise InvalidInputError(f"cannot read the {what} {source} ({e.strerror or e})", field=field) from None


def _credentials(
    tls: bool, ca: PemSource, cert: PemSource = None, key: PemSource = None
) -> grpc.ChannelCredentials | None:
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both `cert` and `key`")
    if not tls and ca is None and cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca, "ca", "CA certificate"),
        private_key=_pem(key, "key", "client key"),
        certificate_chain=_pem(cert, "cert", "client certificate"),
    )


class _Base:
    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        tls: bool = False,
        ca: str | Path | bytes | None = None,
        timeout: float | None = 5.0,
        server_name: str | None = None,
        cert: str | Path | bytes | None = None,
        key: str | Path | bytes | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        """`target`: HOST:PORT. `tls`: use TLS (system roots unless `ca`, a PEM file or bytes, is given;
        `ca` implies TLS). `timeout`: default deadline per call in seconds (None: no deadline).
        `server_name`: override the TLS host name check (e.g. a certificate issued for another name).
        `cert`, `key`: this client's certificate chain and private key (PEM files or bytes), for a server
        with SAFETY_TLS_CLIENT_CA (mutual TLS); they imply TLS. `channel_options`: more gRPC channel
        arguments, besides CHANNEL_OPTIONS (e.g. `grpc.max_reconnect_backoff_ms`). `max_attempts`: tries
        of a call that gets UNAVAILABLE or RESOURCE_EXHAUSTED, 1 to 5 (1: no retries; see MAX_ATTEMPTS)."""
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._credentials = _credentials(tls, ca, cert, key)
        self._options = [
            *CHANNEL_OPTIONS,
            ("grpc.service_config", retry_service_config(max_attempts)),
            ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
            *channel_options,
        ]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))

    def _call_args(self, timeout: float | None, request_id: str | None = None) -> dict[str, Any]:
        """A call's deadline and metadata: the API key, and `request_id` as `x-request-id` when given (the
        server's log lines and access log carry it; without one the server makes its own, which every
        answer's trailers carry). An id the server would not keep raises ValueError before anything is sent
        (gRPC itself fails a call whose header holds a control or non-ASCII character, as INTERNAL)."""
        if request_id is not None and not requestid.valid(request_id):
            most = requestid.MAX_LENGTH
            raise ValueError(
                f"request_id: must be 1 to {most} printable ASCII characters, got {request_id!r}"
            )
        metadata = self._metadata if request_id is None else (*self._metadata, (REQUEST_ID_KEY, request_id))
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": metadata}


class SafetyClient(_Base):
    """Blocking client; thread-safe (one channel, many concurrent calls)."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self.channel = grpc.insecure_channel(target, options=self._options)
        else:
            self.channel = grpc.secure_channel(target, self._credentials, options=self._options)
        self.stub = pb2_grpc.SafetyClassifierStub(self.channel)

    def classify(
        self,
        items: Iterable[ItemLike],
        thresholds: Mapping[str, float] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """One result dict per item, in order. `request_id`: the call's `x-request-id` (`_call_args`)."""
        response = self.stub.Classify(
            build_request(items, thresholds), **self._call_args(timeout, request_id)
        )
        return [result_to_dict(r) for r in response.results]

    def classify_raw(
        self, request: Any, *, timeout: float | None = None, request_id: str | None = None
    ) -> Any:
        """Send a prepared `ClassifyRequest` (e.g. with raw_scores) and return the `ClassifyResponse`."""
        return self.stub.Classify(request, **self._call_args(timeout, request_id))

    def classify_stream(
        self,
        requests: Iterable[Iterable[ItemLike]],
        thresholds: Mapping[str, float] | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Many Classify requests over one ClassifyStream: each element of `requests` (a list of items; sent
        as the iterable produces it, from a gRPC thread) gets one dict, in order (`stream_response_to_dict`):
        its results, or the error Classify would have raised for it, while the stream goes on. `timeout`
        bounds the whole stream (default: none, unlike the per-call default). The stream's own failures
        (UNAUTHENTICATED, UNAVAILABLE) raise `grpc.RpcError`."""
        messages = (build_request(items, thresholds) for items in requests)
        for response in self.stub.ClassifyStream(messages, timeout=timeout, metadata=self._metadata):
            yield stream_response_to_dict(response)

    def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        return info_to_dict(self.stub.Info(pb2.InfoRequest(), **self._call_args(timeout)))

    def submit_job(
        self, items: Iterable[ItemLike], job_id: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Queue a batch job; the job's dict (see `get_job`) plus `resumed`. Re-sending the same `job_id`
        and items (e.g. after a timeout) resumes the job instead of queuing it twice; without a `job_id`
        the client names the job (`new_job_id`), so that its own retries resume it too (`resumed` is then
        True when a try before the last had queued it)."""
        request = pb2.SubmitJobRequest(items=build_items(items), job_id=job_id or new_job_id())
        response = self.stub.SubmitJob(request, **self._call_args(timeout))
        return {**job_to_dict(response.job), "resumed": response.resumed}

    def get_job(self, job_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """job_id, state, total, done, failed, chunks, created_at, started_at, finished_at, model, error,
        finished."""
        return job_to_dict(self.stub.GetJob(pb2.GetJobRequest(job_id=job_id), **self._call_args(timeout)))

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return job_to_dict(
            self.stub.CancelJob(pb2.CancelJobRequest(job_id=job_id), **self._call_args(timeout))
        )

    def delete_job(self, job_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Delete a finished or cancelled job's keys (items, results, record); the job as it was."""
        return job_to_dict(
            self.stub.DeleteJob(pb2.DeleteJobRequest(job_id=job_id), **self._call_args(timeout))
        )

    def stream_job_results(
        self, job_id: str, start_index: int = 0, wait: bool = False, *, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Result lines in item order from `start_index`. `wait=False`: those ready now (stops at the first
        item without a result); `wait=True`: follow the job to its end. `timeout` (default: the client's)
        bounds the whole stream: give `wait=True` one long enough for the job."""
        request = pb2.StreamJobResultsRequest(job_id=job_id, start_index=start_index, wait=wait)
        for line in self.stub.StreamJobResults(request, **self._call_args(timeout)):
            yield job_result_to_dict(line)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SafetyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSafetyClient(_Base):
    """asyncio client (grpc.aio); create and use it inside one running event loop."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self.channel = grpc.aio.secure_channel(target, self._credentials, options=self._options)
        self.stub = pb2_grpc.SafetyClassifierStub(self.channel)

    async def classify(
        self,
        items: Iterable[ItemLike],
        thresholds: Mapping[str, float] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> list[dict[str, Any]]:
        request = build_request(items, thresholds)
        response = await self.stub.Classify(request, **self._call_args(timeout, request_id))
        return [result_to_dict(r) for r in response.results]

    async def classify_raw(
        self, request: Any, *, timeout: float | None = None, request_id: str | None = None
    ) -> Any:
        return await self.stub.Classify(request, **self._call_args(timeout, request_id))

    async def classify_stream(
        self,
        requests: Iterable[Iterable[ItemLike]] | AsyncIterable[Iterable[ItemLike]],
        thresholds: Mapping[str, float] | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """As `SafetyClient.classify_stream`; `requests` may also be an async iterable."""

        async def messages() -> AsyncIterator[Any]:
            if isinstance(requests, AsyncIterable):
                async for items in requests:
                    yield build_request(items, thresholds)
            else:
                for items in requests:
                    yield build_request(items, thresholds)

        call = self.stub.ClassifyStream(messages(), timeout=timeout, metadata=self._metadata)
        async for response in call:
            yield stream_response_to_dict(response)

    async def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        return info_to_dict(await self.stub.Info(pb2.InfoRequest(), **self._call_args(timeout)))

    async def submit_job(
        self, items: Iterable[ItemLike], job_id: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        request = pb2.SubmitJobRequest(items=build_items(items), job_id=job_id or new_job_id())
        response = await self.stub.SubmitJob(request, **self._call_args(timeout))
        return {**job_to_dict(response.job), "resumed": response.resumed}

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        request = pb2.GetJobRequest(job_id=job_id)
        return job_to_dict(await self.stub.GetJob(request, **self._call_args(timeout)))

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        request = pb2.CancelJobRequest(job_id=job_id)
        return job_to_dict(await self.stub.CancelJob(request, **self._call_args(timeout)))

    async def delete_job(self, job_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        request = pb2.DeleteJobRequest(job_id=job_id)
        return job_to_dict(await self.stub.DeleteJob(request, **self._call_args(timeout)))

    async def stream_job_results(
        self, job_id: str, start_index: int = 0, wait: bool = False, *, timeout: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        request = pb2.StreamJobResultsRequest(job_id=job_id, start_index=start_index, wait=wait)
        async for line in self.stub.StreamJobResults(request, **self._call_args(timeout)):
            yield job_result_to_dict(line)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncSafetyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
