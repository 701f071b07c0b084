"""`safety classify` end to end on a real checkpoint: `cli.main` in this process (argv in; exit code,
stdout and stderr out), and as a subprocess where a process is what is tested (`python -m model.cli`, a
closed pipe)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """run(*argv, stdin=None) -> CompletedProcess of `safety *argv`, run by `cli.main` in this process."""
    from model import cli

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # basicConfig's handler goes with the test

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        capsys.readouterr()  # what came before this command is not its output
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse's usage errors; as the interpreter ends a process on one
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["safety", *args], code, out, err)

    return run


def test_classify_texts_and_jsonl(tmp_path: Path, tiny_model_dir: Path, tiny_classifier, run) -> None:
    p = subprocess.run(  # the module's own entry point, once as a process
        [sys.executable, "-m", "model.cli", "classify", "--model", str(tiny_model_dir), "hello", "text 2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(lines) == 2
    expected = tiny_classifier.classify([{"text": "hello"}])[0]
    assert set(lines[0]["scores"]) == set(tiny_classifier.labels)
    assert abs(lines[0]["scores"]["hate"] - expected.scores["hate"]) < 1e-6

    data = tmp_path / "in.jsonl"
    data.write_text(
        json.dumps({"id": "a", "text": "a prompt"}) + "\n\n"
        + json.dumps({"id": "b", "text": "an answer", "role": "response", "context": "a prompt"}) + "\n"
    )  # fmt: skip
    p = run("classify", "--model", str(tiny_model_dir), "--jsonl", str(data), "--threshold", "hate=0")
    assert p.returncode == 0, p.stderr
    out = [json.loads(x) for x in p.stdout.splitlines()]
    assert [o["id"] for o in out] == ["a", "b"]
    assert all("hate" in o["flagged_labels"] for o in out)


def test_classify_errors_are_reported(tmp_path: Path, tiny_model_dir: Path, run) -> None:
    p = run("classify", "--model", str(tiny_model_dir), "--role", "prompt", "--context", "ctx", "text")
    assert p.returncode == 2
    assert "items[0].context" in p.stderr
    p = run("classify", "--model", str(tiny_model_dir), "--threshold", "nope=0.1", "text")
    assert p.returncode == 2 and "thresholds.nope" in p.stderr
    p = run("classify", "--model", str(tiny_model_dir))
    assert p.returncode == 2 and "TEXT" in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": \n')
    p = run("classify", "--model", str(tiny_model_dir), "--jsonl", str(bad))
    assert p.returncode == 2 and f"safety classify: {bad}:3: not valid JSON" in p.stderr, p.stderr
    p = run("classify", "--model", str(tiny_model_dir), "--jsonl", "-", stdin='{"text": "a"}\n["b"]\n')
    assert p.returncode == 2 and "<stdin>:2: must be a JSON object" in p.stderr, p.stderr
    labelled = tmp_path / "labelled.jsonl"  # a field error names the item's line, as a JSON error does
    labelled.write_text('{"text": "fine"}\n\n{"text": "x", "labels": ["hate"]}\n')
    p = run("classify", "--model", str(tiny_model_dir), "--jsonl", str(labelled))
    said = f"safety classify: {labelled}:3: items[1].labels: unknown field(s) ['labels']\n"
    assert p.returncode == 2 and p.stderr == said, p.stderr
    p = run(
        "classify", "--remote", "127.0.0.1:1", "--jsonl", "-", stdin='{"text": "a", "role": "narrator"}\n'
    )
    assert p.returncode == 2, p.stderr  # refused before any call: no server needed to name the line
    narrator = "items[0].role: must be one of ('prompt', 'response'), got 'narrator'"
    assert p.stderr == f"safety classify: <stdin>:1: {narrator}\n", p.stderr
    p = run("classify", "--model", str(tiny_model_dir), "--jsonl", str(tmp_path / "missing.jsonl"))
    assert p.returncode == 2 and "missing.jsonl: file not found" in p.stderr, p.stderr
    p = run("classify", "--model", str(tiny_model_dir), "--threshold", "hate", "text")
    assert p.returncode == 2 and "--threshold: expects LABEL=VALUE" in p.stderr, p.stderr


def test_an_interrupt_before_the_command_handles_it_is_one_line_and_exit_130(monkeypatch, capsys) -> None:
    """Ctrl-C while a command still imports (before `safety submit` sets its own handler) ends the
    command with the shell's SIGINT code and one line, not a KeyboardInterrupt traceback."""
    from model import cli

    def interrupted(args) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "classify_command", interrupted)
    assert cli.main(["--log-level", "INFO", "classify", "text"]) == 130
    assert capsys.readouterr().err == "\nsafety classify: interrupted\n"


def test_wrong_engine_flags_and_log_level_are_usage_errors_not_tracebacks(run) -> None:
    """`--device tpu`, `--dtype fp8` and `--log-level foo` ended in a traceback, exit 1."""
    for args, said in (
        (
            ["classify", "--device", "tpu", "hi"],
            "argument --device: must be auto, cpu, cuda or cuda:N, got 'tpu'",
        ),
        (["classify", "--dtype", "fp8", "hi"], "argument --dtype: must be float32, bfloat16 or float16"),
        (
            ["--log-level", "foo", "job", "status", "x"],
            "argument --log-level: invalid choice: 'FOO' (choose from",
        ),
    ):
        p = run(*args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert said in p.stderr.splitlines()[-1], p.stderr
    from model import cli

    assert cli.build_parser().parse_args(["--log-level", "debug", "classify", "x"]).log_level == "DEBUG"


def test_a_reader_that_goes_away_ends_classify_quietly_with_141(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`safety classify --jsonl F | head -1`: the output's reader leaves after one line; the command stops
    as a process SIGPIPE kills (exit 141), with no BrokenPipeError traceback."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(2000)))
    p = subprocess.Popen(
        [sys.executable, "-m", "model.cli", "classify", "--model", str(tiny_model_dir), "--jsonl", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None and p.stderr is not None
    assert json.loads(p.stdout.readline())["scores"]  # the first result, then the reader goes away
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_line_nested_too_deeply_is_one_line_exit_2(tmp_path: Path, tiny_model_dir: Path, run) -> None:
    """200,000 '[' was a RecursionError traceback, exit 1; locally and with --remote (whose first item is
    read before any call: no server needed)."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 200_000 + "\n")
    said = f"safety classify: {deep}:1: not valid JSON (nested too deeply to parse)\n"
    for where in (["--model", str(tiny_model_dir)], ["--remote", "127.0.0.1:1"]):
        p = run("classify", *where, "--jsonl", str(deep))
        assert p.returncode == 2 and p.stderr.endswith(said) and "Traceback" not in p.stderr, p.stderr
