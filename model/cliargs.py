"""Command-line options shared by the model's subcommands (`safety classify`, `safety eval`, `safety train`).

Owns: `--threshold LABEL=VALUE` (repeatable): its argparse type `parse_threshold`, which refuses a malformed
value with argparse's usage error (exit status 2), and `add_threshold_option`; the argparse types of
`--device` and `--dtype` (`parse_device`, `parse_dtype`: the values model/engine_settings.py accepts, so a
wrong one is a usage error naming the flag, not a traceback from the runner); `positive_seconds`, the
argparse type of every `--timeout` (`safety classify --remote`, `safety submit --wait`, `safety job
results`), which refuses nan, inf, 0 and negative values as a usage error; and what every `safety`
command does when the reader of its output goes away (`| head -1`): `silence_stdout`, then exit `EXIT_PIPE`;
and `stopped_after(n)`, the words that end the error of a run stopped after printing some of its results,
with `count(n, noun)`, how the commands count in their messages.
Must not know: the classifier (the engine validates the label names and the range), torch, gRPC, Celery.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from model.engine_settings import device_problem, dtype_problem

EXIT_PIPE = 141  # 128 + SIGPIPE: the reader of the output went away (`| head`), as a process SIGPIPE kills


def silence_stdout() -> None:
    """Point stdout at /dev/null after its reader went away: what is still buffered must not fail again (and
    print a traceback) at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def count(n: int, noun: str) -> str:
    """'1 item', '2 items', '0 items': how every `safety` command counts in its messages."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def stopped_after(printed: int) -> str:
    """How an error that stops a run part way ends (`safety classify --remote`, whichever way it stopped):
    what was printed before it is complete and in order, and this says how much that is."""
    return f"stopped there, after the results of the first {count(printed, 'item')}"


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


def parse_device(value: str) -> str:
    """The argparse `type` of `--device`: auto, cpu, cuda or cuda:N."""
    if why := device_problem(value):
        raise argparse.ArgumentTypeError(why)
    return value


def parse_dtype(value: str) -> str:
    """The argparse `type` of `--dtype`: float32, bfloat16, float16 (or fp32, bf16, fp16)."""
    if why := dtype_problem(value):
        raise argparse.ArgumentTypeError(why)
    return value


def positive_seconds(value: str) -> float:
    """The argparse `type` of a `--timeout` in seconds: a finite number above 0. `nan` waited for ever, `-1`
    gave up at once ("still running after -1.0s"), `0` as well; argparse names the flag, exit status 2."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expects a number of seconds above 0, got {value!r}")
    return seconds
