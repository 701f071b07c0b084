"""model.cliargs and the `safety` parser: `--threshold`, `--device`, `--dtype`; usage errors by command."""

from __future__ import annotations

import argparse

import pytest

from model.cli import build_parser
from model.cliargs import parse_threshold


def test_parse_threshold() -> None:
    assert parse_threshold("hate=0.3") == ("hate", 0.3)
    assert parse_threshold(" self_harm =1") == ("self_harm", 1.0)
    for bad, message in (
        ("hate", "expects LABEL=VALUE, got 'hate'"),
        ("=0.5", "expects LABEL=VALUE"),
        ("hate=high", "hate: 'high' is not a number"),
        ("hate=", "hate: '' is not a number"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_threshold(bad)


@pytest.mark.parametrize("command", [["classify", "text"], ["eval", "--data", "x.jsonl"]])
def test_both_commands_collect_thresholds(command: list[str], capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    args = parser.parse_args([*command, "--threshold", "hate=0.2", "--threshold", "sexual=0.9"])
    assert dict(args.threshold) == {"hate": 0.2, "sexual": 0.9}
    assert parser.parse_args(command).threshold is None
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*command, "--threshold", "hate:0.2"])
    assert e.value.code == 2
    assert "argument --threshold: expects LABEL=VALUE, got 'hate:0.2'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "flag", "value", "message"),
    [
        (["classify", "hi"], "--device", "tpu", "must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["classify", "hi"], "--dtype", "fp8", "must be float32, bfloat16 or float16 (or fp32, bf16, fp16)"),
        (["eval", "--data", "x.jsonl"], "--device", "tpu", "must be auto, cpu, cuda or cuda:N"),
        (["eval", "--data", "x.jsonl"], "--dtype", "fp8", "must be float32, bfloat16 or float16"),
        (
            ["train", "--data", "x", "--out", "o", "--config", "tiny"],
            "--device",
            "cuda:x",
            "must be auto, cpu, cuda or",
        ),
    ],
)
def test_a_wrong_device_or_dtype_is_a_usage_error_naming_the_flag(
    command: list[str], flag: str, value: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    """It reached the runner, whose ValueError ended `safety classify` in a traceback, exit 1."""
    parser = build_parser(command)
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*command, flag, value])
    assert e.value.code == 2
    assert f"error: argument {flag}: {message}" in capsys.readouterr().err
    assert getattr(parser.parse_args([*command, flag, "cuda:1" if flag == "--device" else "bf16"]), flag[2:])


@pytest.mark.parametrize(
    ("argv", "command", "unknown"),
    [
        (["classify", "--roll", "response", "hi"], "safety classify", "--roll"),
        (["job", "status", "x", "--foo"], "safety job status", "--foo"),
        (["submit", "in.jsonl", "--wiat"], "safety submit", "--wiat"),
        (["serve", "--max-itmes", "3"], "safety serve", "--max-itmes 3"),
        (["eval", "--data", "x.jsonl", "--trheshold", "hate=0.1"], "safety eval", "--trheshold hate=0.1"),
    ],
)
def test_an_unknown_argument_is_the_usage_error_of_the_command_it_follows(
    argv: list[str], command: str, unknown: str, capsys: pytest.CaptureFixture
) -> None:
    """It was the top-level parser's: `usage: safety [-h] ...`, not the usage of the mistyped command."""
    with pytest.raises(SystemExit) as e:
        build_parser(argv).parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {command} "), err
    assert err.endswith(f"\n{command}: error: unrecognized arguments: {unknown}\n"), err
