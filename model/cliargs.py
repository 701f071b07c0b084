"""Command-line options shared by the model's subcommands (`safety classify`, `safety eval`).

Owns: `--threshold LABEL=VALUE` (repeatable): its argparse type `parse_threshold`, which refuses a malformed
value with argparse's usage error (exit status 2), and `add_threshold_option`. Must not know: the
classifier (the engine validates the label names and the range), gRPC, Celery.
"""

from __future__ import annotations

import argparse


def parse_threshold(value: str) -> tuple[str, float]:
    """The argparse `type` of `--threshold LABEL=VALUE` (safety classify, safety eval): ("hate", 0.3).
    Collect with `action="append"` and pass `dict(args.threshold or [])` on."""
    label, sep, num = value.partition("=")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"expects LABEL=VALUE, got {value!r}")
    try:
        return label.strip(), float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{label.strip()}: {num!r} is not a number") from None


def add_threshold_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold",
        action="append",
        type=parse_threshold,
        metavar="LABEL=VALUE",
        help="override a label's threshold (repeatable)",
    )
