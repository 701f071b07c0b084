"""Settings: SAFETY_* variables, flags over variables, validation naming the variable; stub generation."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from model.engine_settings import EngineSettings
from model.errors import ConfigError
from service import protogen
from service.settings import ServeSettings, add_arguments, from_args
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    s = ServeSettings.from_env({})
    assert s.address == "[::]:50051" and s.metrics_address == "0.0.0.0:9090"
    assert s.max_wait_ms == 2.0 and s.max_items == 256 and s.max_text_chars == 200_000
    assert s.drain_grace_s == 20.0 and s.model is None and s.api_key is None
    assert s.deadline_horizon_ms == 10_000.0


def test_env_then_flags() -> None:
    env = {"SAFETY_MODEL": "/m", "SAFETY_MAX_WAIT_MS": "5", "SAFETY_MAX_BATCH_TOKENS": "4096",
           "SAFETY_METRICS_ADDRESS": "off", "SAFETY_API_KEY": "k", "SAFETY_ADDRESS": ""}  # fmt: skip
    s = from_args(parse("--max-wait-ms", "1.5", "--max-items", "8", "--deadline-horizon-ms", "250"), env)
    assert s.model == "/m" and s.max_batch_tokens == 4096 and s.api_key == "k"
    assert s.deadline_horizon_ms == 250.0
    assert s.max_wait_ms == 1.5 and s.max_items == 8  # flags win
    assert s.metrics_address is None  # "off"
    assert s.address == "[::]:50051"  # empty variable = unset


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SAFETY_MAX_ITEMS": "0"}, "SAFETY_MAX_ITEMS"),
        ({"SAFETY_MAX_WAIT_MS": "-1"}, "SAFETY_MAX_WAIT_MS"),
        ({"SAFETY_DEADLINE_HORIZON_MS": "-1"}, "SAFETY_DEADLINE_HORIZON_MS"),
        ({"SAFETY_MAX_QUEUE_TOKENS": "many"}, "SAFETY_MAX_QUEUE_TOKENS"),
        ({"SAFETY_TLS_CERT": "/c.pem"}, "SAFETY_TLS_CERT"),
        ({"SAFETY_LOG_FORMAT": "xml"}, "SAFETY_LOG_FORMAT"),
        ({"SAFETY_COMPILE": "yes"}, "SAFETY_COMPILE"),
        ({"SAFETY_CUDA_GRAPHS": "always"}, "SAFETY_CUDA_GRAPHS"),
        ({"SAFETY_GRAPH_TOKENS": "255"}, "SAFETY_GRAPH_TOKENS"),
        ({"SAFETY_FUSED_GEMM": "yes"}, "SAFETY_FUSED_GEMM"),
        ({"SAFETY_ATTENTION": "flash"}, "SAFETY_ATTENTION"),
        ({"SAFETY_THREADS": "0"}, "SAFETY_THREADS"),
        ({"SAFETY_ADDRESS": "localhost"}, "SAFETY_ADDRESS"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ServeSettings.from_env(env)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAFETY_ADDRESS", "127.0.0.1:99999"),  # grpc bound 99999 % 65536 = 34463
        ("SAFETY_ADDRESS", "[::]:65536"),
        ("SAFETY_METRICS_ADDRESS", "0.0.0.0:99999"),
        ("SAFETY_METRICS_ADDRESS", "0.0.0.0:-1"),
    ],
)
def test_a_port_out_of_range_is_refused_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"^{variable}: must be HOST:PORT with a port in 0-65535, got"):
        ServeSettings.from_env({variable: value})
    flag = "--" + variable.removeprefix("SAFETY_").lower().replace("_", "-")
    with pytest.raises(
        ValueError, match=f"^{flag}: must be HOST:PORT"
    ):  # a flag's value: checked the same way
        from_args(parse(flag, value), {})


def test_ports_at_the_ends_of_the_range_are_accepted() -> None:
    s = ServeSettings.from_env({"SAFETY_ADDRESS": "127.0.0.1:0", "SAFETY_METRICS_ADDRESS": "[::]:65535"})
    assert (s.address, s.metrics_address) == ("127.0.0.1:0", "[::]:65535")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize(
    "variable", ["SAFETY_MAX_WAIT_MS", "SAFETY_DEADLINE_HORIZON_MS", "SAFETY_DRAIN_GRACE_S"]
)
def test_a_float_setting_must_be_finite(variable: str, value: str) -> None:
    """float() parses 'nan' and 'inf', and nan passes a `< 0` check: a NaN drain grace never ends."""
    with pytest.raises(ValueError, match=f"^{variable}: must be a finite number >= 0, got"):
        ServeSettings.from_env({variable: value})
    if variable == "SAFETY_DRAIN_GRACE_S":  # the worker's own drain grace
        with pytest.raises(ConfigError, match=f"{variable}.*must be a finite number >= 0"):
            WorkerSettings.from_env({variable: value})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin the process to one")
def test_default_encode_threads_follow_the_cpus_the_process_may_use() -> None:
    """A process pinned to one CPU (as a cgroup quota or an affinity mask limits a container) tokenizes on
    one thread by default: os.cpu_count() reports the node's cores, which a container may not use."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from service.settings import ServeSettings as S; "
        "print(S.from_env({}).encode_threads, S.from_env({}, encode_threads=3).encode_threads)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFETY_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3"]  # an explicit setting still wins


def test_help_documents_every_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    from dataclasses import fields

    for f in fields(ServeSettings):
        assert f.metadata["env"] in text, f.name


def test_protogen_writes_importable_package_stubs(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path / "_proto")
    assert {p.name for p in written} == set(protogen.STUB_FILES)
    grpc_stub = (tmp_path / "_proto/safety/v1/safety_pb2_grpc.py").read_text()
    assert "from service._proto.safety.v1 import safety_pb2" in grpc_stub
    assert "from safety.v1 import" not in grpc_stub
    assert (tmp_path / "_proto/safety/v1/safety.proto").is_file()  # shipped alongside, for wheels
    spec = importlib.util.spec_from_file_location(
        "generated_pb2", tmp_path / "_proto/safety/v1/safety_pb2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # same descriptor as the package's stubs: the pool accepts it again
    assert module.DESCRIPTOR.services_by_name["SafetyClassifier"].methods_by_name["Classify"]


ENGINE = [f.metadata["env"] for f in fields(EngineSettings)]


def test_both_front_ends_read_the_engine_variables_the_same_way() -> None:
    env = {"SAFETY_ATTENTION": "sdpa", "SAFETY_COMPILE": "off", "SAFETY_THREADS": "3",
           "SAFETY_DEVICE": "cpu", "SAFETY_MAX_BATCH_TOKENS": "auto", "SAFETY_MAX_TEXT_CHARS": "1000",
           "SAFETY_DTYPE": ""}  # fmt: skip
    for cls in (ServeSettings, WorkerSettings):
        names = [f.metadata["env"] for f in fields(cls)]
        assert names[: len(ENGINE)] == ENGINE and len(set(names)) == len(names)  # declared once, no clash
        s = cls.from_env(env)
        assert (s.attention, s.compile, s.threads, s.device) == ("sdpa", "off", 3, "cpu")
        assert (s.max_batch_tokens, s.max_text_chars, s.dtype) == (None, 1000, None)


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("SAFETY_ATTENTION", "flash", "must be auto, flash_attn, varlen, sdpa, triton or triton_local"),
        ("SAFETY_COMPILE", "yes", "must be auto, on or off"),
        ("SAFETY_THREADS", "0", "must be a positive integer"),
        ("SAFETY_MAX_BATCH_SEQUENCES", "-4", "must be a positive integer"),
        ("SAFETY_MAX_TEXT_CHARS", "0", "must be a positive integer"),
        ("SAFETY_MAX_BATCH_TOKENS", "lots", "cannot parse 'lots'"),
        ("SAFETY_DEVICE", "tpu", "must be auto, cpu, cuda or cuda:N"),
        ("SAFETY_DTYPE", "float8", "must be float32, bfloat16 or float16"),
    ],
)
def test_a_bad_engine_value_names_its_variable_in_each_front_ends_error(variable: str, value: str, why: str):
    with pytest.raises(ValueError, match=f"^{variable}: {why}"):
        ServeSettings.from_env({variable: value})
    with pytest.raises(ConfigError, match=f"{variable}.*{why}"):
        WorkerSettings.from_env({variable: value})


def test_api_keys_are_stripped_and_may_be_several() -> None:
    assert ServeSettings.from_env({"SAFETY_API_KEY": "k1-secret\n"}).api_key == "k1-secret"
    assert ServeSettings.from_env({"SAFETY_API_KEY": " k1, k2\n"}).api_key == "k1,k2"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SAFETY_API_KEY": "k1-secret,,k2"}, "^SAFETY_API_KEY: key 2 is empty"),
        ({"SAFETY_API_KEY": "\n"}, "^SAFETY_API_KEY: key 1 is empty"),
        ({"SAFETY_API_KEY": "k1 secret"}, "^SAFETY_API_KEY: key 1 contains whitespace"),
        ({"SAFETY_API_KEY": "k1", "SAFETY_API_KEY_FILE": "/k"}, "^SAFETY_API_KEY: set either"),
        ({"SAFETY_API_KEY_FILE": "/nonexistent/keys"}, "^SAFETY_API_KEY_FILE: /nonexistent/keys: cannot"),
    ],
)
def test_bad_api_key_settings_are_refused_without_showing_a_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        ServeSettings.from_env(env)
    assert "secret" not in str(err.value)


def test_an_api_key_file_must_hold_a_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# no key yet\n\n")
    with pytest.raises(ValueError, match=r"^SAFETY_API_KEY_FILE: .*keys: no key in it"):
        ServeSettings.from_env({"SAFETY_API_KEY_FILE": str(path)})
    path.write_text("k1\n")
    s = from_args(parse("--api-key-file", str(path)), {})
    assert s.api_key_file == str(path) and s.api_key is None


def test_metrics_address_off_disables_it_and_empty_means_the_default_as_for_every_setting() -> None:
    """--help said "('' or off: none)", but an empty value, flag or variable, is unset (settings_base)."""
    assert from_args(parse("--metrics-address", "off"), {}).metrics_address is None
    assert from_args(parse("--metrics-address", "OFF"), {}).metrics_address is None
    assert from_args(parse("--metrics-address", ""), {}).metrics_address == "0.0.0.0:9090"
    assert ServeSettings.from_env({"SAFETY_METRICS_ADDRESS": ""}).metrics_address == "0.0.0.0:9090"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    [action] = [a for a in parser._actions if a.dest == "setting_metrics_address"]
    assert "off: none" in action.help and "''" not in action.help


@pytest.mark.parametrize(
    ("flag", "value", "variable", "why"),
    [
        ("--max-items", "0", "SAFETY_MAX_ITEMS", "must be a positive integer, got 0"),
        ("--device", "tpu", "SAFETY_DEVICE", "must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("--max-wait-ms", "nan", "SAFETY_MAX_WAIT_MS", "must be a finite number >= 0, got nan"),
        ("--log-format", "xml", "SAFETY_LOG_FORMAT", "must be json or text, got 'xml'"),
    ],
)
def test_a_refused_value_is_named_the_way_it_was_given(
    flag: str, value: str, variable: str, why: str
) -> None:
    """`safety serve --max-items 0` said `SAFETY_MAX_ITEMS: ...`, naming a variable the user had not set."""
    with pytest.raises(ValueError, match=f"^{flag}: {why}$"):
        from_args(parse(flag, value), {})
    with pytest.raises(ValueError, match=f"^{variable}: {why}$"):
        from_args(parse(), {variable: value})
    with pytest.raises(ValueError, match=f"^{flag}: {why}$"):  # the flag's value is the one used, and refused
        from_args(parse(flag, value), {variable: "1" if variable == "SAFETY_MAX_ITEMS" else ""})


@pytest.mark.parametrize(
    ("flag", "value", "why"),
    [
        ("--max-items", "abc", "expected an integer"),
        ("--max-wait-ms", "soon", "expected a number"),
        ("--max-queue-tokens", "lots", "expected an integer, or auto or none (unset)"),
    ],
)
def test_a_value_that_does_not_parse_says_what_was_expected(
    flag: str, value: str, why: str, capsys: pytest.CaptureFixture
) -> None:
    """`SAFETY_MAX_ITEMS=abc` said only `cannot parse 'abc'`; the flag of an opt_int said `invalid opt_int
    value`."""
    variable = "SAFETY_" + flag[2:].upper().replace("-", "_")
    with pytest.raises(ValueError, match=re.escape(f"{variable}: cannot parse '{value}': {why}")):
        ServeSettings.from_env({variable: value})
    with pytest.raises(SystemExit):
        parse(flag, value)
    assert f"error: argument {flag}: cannot parse '{value}': {why}\n" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "variable", "broken", "field", "parsed"),
    [
        ("--max-items", "5", "SAFETY_MAX_ITEMS", "abc", "max_items", 5),
        ("--max-wait-ms", "3.5", "SAFETY_MAX_WAIT_MS", "soon", "max_wait_ms", 3.5),
        ("--max-queue-tokens", "4096", "SAFETY_MAX_QUEUE_TOKENS", "lots", "max_queue_tokens", 4096),
    ],
)
def test_the_variable_of_a_setting_a_flag_gives_is_not_read(
    flag: str, value: str, variable: str, broken: str, field: str, parsed: object
) -> None:
    """`--max-items 5` with SAFETY_MAX_ITEMS=abc refused to start with `--max-items: cannot parse 'abc'`,
    blaming the flag for the variable's value, which the flag overrode. The flag wins and its variable is
    not read; a broken variable of a setting no flag gives is still refused, under its own name."""
    assert getattr(from_args(parse(flag, value), {variable: broken}), field) == parsed
    with pytest.raises(ValueError, match=f"^{variable}: cannot parse '{broken}': expected "):
        from_args(parse(), {variable: broken})
    with pytest.raises(ValueError, match=r"^SAFETY_DRAIN_GRACE_S: cannot parse 'later': expected a number$"):
        from_args(parse(flag, value), {variable: broken, "SAFETY_DRAIN_GRACE_S": "later"})


def test_an_explicit_override_wins_over_a_variable_that_does_not_parse() -> None:
    """The same rule for the settings' own overrides, in both front ends (the server makes the job client's
    WorkerSettings with its own max_text_chars)."""
    assert ServeSettings.from_env({"SAFETY_MAX_ITEMS": "abc"}, max_items=5).max_items == 5
    worker = WorkerSettings.from_env({"SAFETY_MAX_TEXT_CHARS": "many"}, max_text_chars=1000)
    assert worker.max_text_chars == 1000
    with pytest.raises(ValueError, match=r"SAFETY_MAX_TEXT_CHARS'?: cannot parse 'many'"):
        WorkerSettings.from_env({"SAFETY_MAX_TEXT_CHARS": "many"})


def test_a_checkpoint_that_does_not_load_is_named_by_its_setting(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`safety serve --model /nope` logged `startup failed: /nope: not a directory`, naming no setting."""
    from model.errors import CheckpointError

    missing, weightless = tmp_path / "nope", tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=f"^--model or SAFETY_MODEL: {missing}: not a directory$"):
        ServeSettings(model=str(missing), device="cpu").load()
    with pytest.raises(
        CheckpointError, match=f"^--model or SAFETY_MODEL: {weightless}: no model.safetensors"
    ):
        ServeSettings(model=str(weightless), device="cpu").load()
    with pytest.raises(CheckpointError, match=f"^SAFETY_MODEL: {missing}: not a directory$"):  # no flag
        WorkerSettings(model=str(missing), device="cpu").load()
