"""model.cliargs: `--threshold LABEL=VALUE`, parsed the same way by `safety classify` and `safety eval`."""

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
