"""Command-line glue of the service: `safety serve` and the `--remote` backend of `safety classify`.

Owns: `register(subparsers)` (entry point `safety.commands: serve`), which adds one flag per setting (with
its `SAFETY_*` variable named in --help), and `remote_classify` (entry point `safety.remote: grpc`), which
model/cli.py calls for `safety classify --remote HOST:PORT`. Must not know: how serving works (server.py)
or the wire format (client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

EPILOG = """\
Every flag falls back to the SAFETY_* environment variable named in its help, then to the default.
Health: grpc.health.v1 on the same port (NOT_SERVING until the model is loaded and warmed, and while
draining). Metrics: Prometheus text format at http://METRICS_ADDRESS/metrics. SIGTERM: NOT_SERVING, finish
in-flight calls within --drain-grace-s, exit 0 (calls still in flight then are cut: a warning, exit 1; a
second SIGTERM/SIGINT stops at once). Batch-job RPCs (SubmitJob, GetJob, StreamJobResults,
CancelJob, DeleteJob) use SAFETY_REDIS_URL, SAFETY_QUEUE, SAFETY_CHUNK_SIZE and SAFETY_RESULT_TTL_S, as the
workers do (docs/jobs.md). gRPC core's own (plain-text) log lines: GRPC_VERBOSITY, ERROR unless it is set.
TLS: certificate, key and client CA (--tls-client-ca: mutual TLS) are re-read when their files change;
SIGHUP only logs that and re-checks them.
"""


def serve_command(args: argparse.Namespace) -> int:
    # gRPC core logs on its own (e.g. "ssl_transport_security.cc ... Handshake failed" for every plaintext
    # connection to a TLS port), in plain text that breaks the JSON-lines log: errors only, unless the
    # operator set GRPC_VERBOSITY. Read when grpc's core initialises: before service.server imports grpc.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from service.jobs import check_job_settings
    from service.server import serve
    from service.settings import from_args

    try:
        settings = from_args(args)
        check_job_settings(settings)  # SAFETY_REDIS_URL, ...: now, not at the first job call
    except ValueError as e:
        print(f"safety serve: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(settings))


def register(subparsers: argparse._SubParsersAction) -> None:
    from service.settings import add_arguments

    parser = subparsers.add_parser(
        "serve",
        help="serve the gRPC API (safety.v1.SafetyClassifier) with dynamic batching",
        description="Serve the safety.v1.SafetyClassifier gRPC API: dynamic length-bucketed batching, "
        "admission control, health, reflection, Prometheus metrics, TLS and API-key auth.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=serve_command)


CLIENT_API_KEY = "SAFETY_CLIENT_API_KEY"  # not SAFETY_API_KEY: that is the server's list of accepted keys


def remote_classify(
    target: str,
    items: Iterable[str | Mapping[str, Any]],
    api_key: str | None = None,
    *,
    thresholds: Mapping[str, float] | None = None,
    tls: bool = False,
    ca: str | None = None,
    timeout: float | None = 30.0,
    server_name: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Classify `items` on a running `safety serve` at `target` (HOST:PORT): one dict per item, in the
    shape of the engine's `Result.to_dict()`, in order. Any number of items: they are read as needed and sent
    in consecutive Classify requests within the server's limits (its Info: items and bytes per request, and
    an estimate of tokens: `split_requests`), one at a time, each with the deadline `timeout` (its retries
    included); a request's results are yielded as soon as they arrive. Info and each request go again, at
    most RETRIES times and within that deadline, when the server refuses them as busy (after its hint) or
    is unavailable (not listening yet, starting, draining, restarting: after its hint or a backoff) or cuts
    them with CANCELLED (after a backoff), each
    retry said on stderr (`service.retries`); a request the server finds larger than its whole queue goes
    again in halves (`_send`). An item too large to send, or an error of `items` itself, comes after the
    results of the items before it. `api_key` None: the variable SAFETY_CLIENT_API_KEY, if set.
    `client_cert`/`client_key`: for a server that requires client certificates (SAFETY_TLS_CLIENT_CA). A
    failed call exits with the status code and message, a hint for the CLI user where one helps (a server
    that is not there, a key), and how many results were yielded before it."""
    from model.cliargs import stopped_after
    from model.errors import InvalidInputError
    from service.client import SafetyClient, result_to_dict, split_requests

    if (client_cert is None) != (client_key is None):  # a usage error: `safety classify` exits 2
        missing = "--client-cert" if client_cert is None else "--client-key"
        raise InvalidInputError(
            "a client certificate needs both --client-cert and --client-key", field=missing
        )
    key_from = "--api-key"
    if api_key is None:
        api_key, key_from = os.environ.get(CLIENT_API_KEY, "").strip() or None, CLIENT_API_KEY
    sent = key_from if api_key else None  # where the key sent came from
    secure = tls or ca is not None or client_cert is not None  # as SafetyClient decides it
    try:
        client = SafetyClient(
            target, api_key=api_key, tls=tls, ca=ca, timeout=timeout, server_name=server_name,
            cert=client_cert, key=client_key,
            max_attempts=1,  # `Retries` retries, saying so on stderr
        )  # fmt: skip
    except InvalidInputError as e:  # an unreadable PEM file: named by its flag
        flag = {"ca": "--ca", "cert": "--client-cert", "key": "--client-key"}.get(e.field)
        if flag is None:
            raise
        raise InvalidInputError(e.reason, field=flag) from None
    with client:
        printed = 0
        try:
            limits = _info(client, target, timeout, secure)
            for first, request in split_requests(items, limits, thresholds):
                for result in _send(client, first, request, target, timeout, secure):
                    yield result_to_dict(result)
                    printed += 1
        except _Refused as e:  # Info (nothing printed yet) or a request, failed for good
            said = _failed(
                e.error,
                target,
                key_from=sent,
                tls=secure,
                first=e.first,
                note=e.note,
                serves_tls=e.serves_tls,
            )
            raise SystemExit(said + (f"; {stopped_after(printed)}" if printed else "")) from None


class _Refused(Exception):
    """A request of `safety classify --remote` failed for good: the server's `error`, the index of the
    request's first item in the whole input (`first`), what the client tried (`note`), and whether the
    target answered a TLS handshake, if the retries asked (`serves_tls`: `Retries.serves_tls`)."""

    def __init__(self, error: Any, first: int, note: str = "", serves_tls: bool | None = None) -> None:
        super().__init__(note)
        self.error, self.first, self.note, self.serves_tls = error, first, note, serves_tls


def _info(client: Any, target: str, timeout: float | None, tls: bool = False) -> dict[str, Any]:
    """The server's limits (its Info), asked again as `service.retries` says (a server still starting, or
    not listening yet: UNAVAILABLE); _Refused when it fails for good. `tls`: whether the call uses TLS."""
    import grpc

    from service.retries import Retries

    retries = Retries(target, "asking for its limits (Info) again", timeout, tls=tls)
    while True:
        try:
            return client.info(timeout=retries.time_left())["limits"]
        except grpc.RpcError as e:
            note = retries.after(e)
            if note is not None:
                raise _Refused(e, 0, note, retries.serves_tls) from None


def _send(
    client: Any, first: int, request: Any, target: str, timeout: float | None, tls: bool = False
) -> Iterator[Any]:
    """The pb2.Results of `request` (whose first item is the input's item `first`), in order, within the
    deadline `timeout` (seconds from the first try; every try of the request shares it). Sent again as
    `service.retries` says: refused as busy (RESOURCE_EXHAUSTED with the server's retry hint) after the hint;
    UNAVAILABLE (no server yet, one starting, draining or restarting) after the server's hint or a backoff;
    at most RETRIES times, saying so on stderr. Refused as larger than the server allows a request to be as
    a whole (more tokens than its whole queue: the client's estimate was short): its halves, one after the
    other, each with a deadline of its own. Anything else, or a single item refused that way, raises
    _Refused. `tls`: whether the call uses TLS (`Retries`)."""
    import grpc

    from service.client import halves, too_large_as_a_whole
    from service.retries import Retries

    n = len(request.items)
    which = f"items[{first}]" if n == 1 else f"items[{first}..{first + n - 1}]"
    retries = Retries(target, f"sending {which} again", timeout, tls=tls)
    while True:
        try:
            response = client.classify_raw(request, timeout=retries.time_left())
        except grpc.RpcError as e:
            error = e
        else:
            yield from response.results
            return
        if n > 1 and too_large_as_a_whole(error):
            head, tail = halves(request)
            yield from _send(client, first, head, target, timeout, tls)
            yield from _send(client, first + len(head.items), tail, target, timeout, tls)
            return
        note = retries.after(error)
        if note is not None:
            raise _Refused(error, first, note, retries.serves_tls)


def _failed(
    error: Any,
    target: str,
    *,
    key_from: str | None,
    tls: bool,
    first: int = 0,
    note: str = "",
    serves_tls: bool | None = None,
) -> str:
    """The line `safety classify --remote` exits with (the caller adds how many results were printed): the
    status and the server's message (an item's index counted from the first item of the whole input, not of
    the request that failed), and what to do. `key_from`: where the API key sent came from (None: none was
    sent); `first`: the index of the failed request's first item; `note`: what the client tried;
    `serves_tls`: whether the target answered a TLS handshake (`service.retries.speaks_tls`; None: not
    asked)."""
    import grpc

    message = error.details() or ""
    if first:  # "items[3].text: ..." of the request that began at item `first`
        message = re.sub(r"^items\[(\d+)\]", lambda m: f"items[{first + int(m[1])}]", message)
    said = f"safety classify --remote {target}: {error.code().name}: {message}"
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        if key_from is not None:
            said += f"; the key of {key_from} is not one the server accepts"
        else:
            said += f"; pass the server's API key in {CLIENT_API_KEY} (or --api-key KEY, which `ps` shows)"
            if os.environ.get("SAFETY_API_KEY"):
                said += f"; SAFETY_API_KEY is the server's setting, the client reads {CLIENT_API_KEY}"
    elif error.code() == grpc.StatusCode.UNAVAILABLE and message.startswith("failed to connect"):
        if not tls and message.endswith("Socket closed") and serves_tls is False:  # no TLS there either
            said += (
                f" (something at {target} accepts connections and closes them: a proxy, port-forward or load "
                "balancer with no server behind it yet?)"
            )
        elif not tls and message.endswith("Socket closed"):  # what a plaintext call to a TLS port sees
            said += f" (does {target} serve TLS? then pass --tls, and --ca FILE for a private CA)"
        elif "Tls handshake failed" not in message:  # that one says what failed
            said += f" (is `safety serve` running at {target}?)"
    if note:
        said += f"; {note}"
    return said
