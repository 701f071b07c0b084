"""The `safety` command line.

Owns: the top-level parser and `safety classify`. Other packages add subcommands through the entry-point
group `safety.commands` (each entry point is `register(subparsers)`), and `--remote` classification goes
through the group `safety.remote`, so this module never imports gRPC or Celery.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from typing import Any

from model.cliargs import (
    EXIT_PIPE,
    add_threshold_option,
    parse_device,
    parse_dtype,
    positive_seconds,
    silence_stdout,
    stopped_after,
)
from model.errors import InvalidInputError, SafetyError
from model.items import check_item, fields_of
from model.jsonl import read_jsonl


def classify_command(args: argparse.Namespace) -> int:
    items = _items(args)
    first = next(items, None)
    if first is None:
        print("safety classify: give TEXT arguments or --jsonl FILE", file=sys.stderr)
        return 2
    items = itertools.chain([first], items)
    thresholds = dict(args.threshold or [])
    if args.remote:
        remote = {ep.name: ep for ep in entry_points(group="safety.remote")}
        if "grpc" not in remote:
            need = (
                "safety classify --remote needs the service extra: pip install 'safety-classifier[service]'"
            )
            print(need, file=sys.stderr)
            return 2
        # read as they are sent, in requests the server accepts; each request's results print as they come
        results = remote["grpc"].load()(args.remote, items, thresholds=thresholds, api_key=args.api_key,
                                        tls=args.tls, ca=args.ca, timeout=args.timeout,
                                        client_cert=args.client_cert, client_key=args.client_key)  # fmt: skip
    else:
        from model import load_classifier

        batch = list(items)  # every item checked before the model loads
        clf = load_classifier(args.model, device=args.device, dtype=args.dtype, max_tokens=args.max_tokens)
        results = (r.to_dict() for r in clf.classify(batch, thresholds=thresholds))
    printed = 0
    try:
        for r in results:
            print(json.dumps(r, ensure_ascii=False), flush=bool(args.remote))
            printed += 1
    except SafetyError as e:  # the input, refused part way (a bad line, an item too large to send)
        if not printed:
            raise
        print(f"safety classify: {e}; {stopped_after(printed)}", file=sys.stderr)
        return 2
    return 0


def _items(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The items of --jsonl, read one at a time, then the TEXT arguments. Each is checked as it is read, here
    so that an item's error names its line, whichever engine (local, remote) classifies it."""
    index = 0
    if args.jsonl:
        for where, obj in read_jsonl(args.jsonl):
            try:
                check_item(fields_of(obj, index), index)
            except InvalidInputError as e:
                raise InvalidInputError(str(e), field=where) from None
            yield obj
            index += 1
    for text in args.texts:
        item = {"text": text, "role": args.role}
        if args.context is not None:
            item["context"] = args.context
        yield item


def register_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify texts; one JSON result per line on stdout")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument(
        "--model",
        default=os.environ.get("SAFETY_MODEL") or None,
        help="checkpoint directory (default: $SAFETY_MODEL, else the bundled model)",
    )
    p.add_argument("--role", choices=("prompt", "response"), default="prompt", help="role of the TEXT items")
    p.add_argument("--context", default=None, help="for --role response: the prompt that produced TEXT")
    p.add_argument("--jsonl", default=None, metavar="FILE",
                   help="items as JSON lines {id?, text, role?, context?} ('-' = stdin)")  # fmt: skip
    add_threshold_option(p)
    p.add_argument("--device", default="auto", type=parse_device, help="auto | cpu | cuda[:N]")
    p.add_argument(
        "--dtype",
        default=None,
        type=parse_dtype,
        help="float32 | bfloat16 | float16 (default: fp32 CPU, bf16 CUDA)",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="window size in tokens (default: model max)")
    p.add_argument(
        "--remote",
        default=None,
        metavar="HOST:PORT",
        help="classify on a running `safety serve`, in requests within its limits (any number of items)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="with --remote: the server's API key (default: $SAFETY_CLIENT_API_KEY; prefer the variable: "
        "flags show in `ps`)",
    )
    p.add_argument("--tls", action="store_true", help="with --remote: use TLS")
    p.add_argument("--ca", default=None, help="with --remote --tls: CA certificate file")
    p.add_argument("--client-cert", default=None, metavar="FILE",
                   help="with --remote: this client's PEM certificate, for a server with "
                   "SAFETY_TLS_CLIENT_CA (mutual TLS; implies --tls)")  # fmt: skip
    p.add_argument("--client-key", default=None, metavar="FILE",
                   help="with --client-cert: its PEM private key")  # fmt: skip
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        help="with --remote: deadline of each request, its retries included, in seconds",
    )
    p.set_defaults(func=classify_command)


class CommandParser(argparse.ArgumentParser):
    """The parser of a subcommand (and, inherited, of its own subcommands: `safety job status`): an argument
    it does not know is its usage error. argparse leaves a subparser's unknown arguments to the top-level
    parser, which printed `usage: safety ...` and not the usage of the command that was mistyped."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `safety` parser. Given the command line, only the named command's entry point is loaded: the
    others may import torch (train, eval), which would cost `safety job status` seconds."""
    parser = argparse.ArgumentParser(prog="safety", description="Content-safety classification (ModernBERT).")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help="logging level: DEBUG | INFO | WARNING | ERROR | CRITICAL (default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    register_classify(sub)
    commands = sorted(entry_points(group="safety.commands"), key=lambda e: e.name)
    named = _command(argv)
    if any(ep.name == named for ep in commands):
        commands = [ep for ep in commands if ep.name == named]
    for ep in commands:
        if ep.name == "classify":
            continue
        try:
            register = ep.load()
        except ImportError as e:  # an extra that is not installed must not break the other commands
            _unavailable(sub, ep.name, e)
            continue
        register(sub)
    return parser


def _unavailable(sub: argparse._SubParsersAction, name: str, error: ImportError) -> None:
    why = f"safety {name} is unavailable: {error} (install the extra: pip install 'safety-classifier[...]')"

    def fail(_: argparse.Namespace) -> int:
        print(why, file=sys.stderr)
        return 2

    p = sub.add_parser(name, help=f"(unavailable: {error})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=fail)


def _command(argv: Sequence[str] | None) -> str | None:
    """The command word of a `safety` command line (after the global --log-level), if any."""
    words = list(sys.argv[1:] if argv is None else argv)
    while words and words[0].startswith("-"):
        option = words.pop(0)
        if option == "--log-level" and words:
            words.pop(0)
    return words[0] if words else None


EXIT_INTERRUPTED = 130  # a shell's code for a process stopped by SIGINT


def main(argv: list[str] | None = None) -> int:
    command = _command(sys.argv[1:] if argv is None else argv) or ""
    try:
        args = build_parser(argv).parse_args(argv)
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a reader gone away is caught, not at exit
        return code
    except SafetyError as e:
        print(f"safety {command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of the output went away (`safety classify ... | head -1`)
        silence_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:  # Ctrl-C before a command set its own handler (while it still imports)
        print(f"\nsafety {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
