"""Settings: SAFETY_* variables, flags over variables, validation naming the variable; stub generation."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from service import protogen
from service.settings import ServeSettings, add_arguments, from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    s = ServeSettings.from_env({})
    assert s.address == "[::]:50051" and s.metrics_address == "0.0.0.0:9090"
    assert s.max_wait_ms == 2.0 and s.max_items == 256 and s.max_text_chars == 200_000
    assert s.drain_grace_s == 20.0 and s.model is None and s.api_key is None


def test_env_then_flags() -> None:
    env = {"SAFETY_MODEL": "/m", "SAFETY_MAX_WAIT_MS": "5", "SAFETY_MAX_BATCH_TOKENS": "4096",
           "SAFETY_METRICS_ADDRESS": "off", "SAFETY_API_KEY": "k", "SAFETY_ADDRESS": ""}  # fmt: skip
    s = from_args(parse("--max-wait-ms", "1.5", "--max-items", "8"), env)
    assert s.model == "/m" and s.max_batch_tokens == 4096 and s.api_key == "k"
    assert s.max_wait_ms == 1.5 and s.max_items == 8  # flags win
    assert s.metrics_address is None  # "off"
    assert s.address == "[::]:50051"  # empty variable = unset


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SAFETY_MAX_ITEMS": "0"}, "SAFETY_MAX_ITEMS"),
        ({"SAFETY_MAX_WAIT_MS": "-1"}, "SAFETY_MAX_WAIT_MS"),
        ({"SAFETY_MAX_QUEUE_TOKENS": "many"}, "SAFETY_MAX_QUEUE_TOKENS"),
        ({"SAFETY_TLS_CERT": "/c.pem"}, "SAFETY_TLS_CERT"),
        ({"SAFETY_LOG_FORMAT": "xml"}, "SAFETY_LOG_FORMAT"),
        ({"SAFETY_COMPILE": "yes"}, "SAFETY_COMPILE"),
        ({"SAFETY_ATTENTION": "flash"}, "SAFETY_ATTENTION"),
        ({"SAFETY_THREADS": "0"}, "SAFETY_THREADS"),
        ({"SAFETY_ADDRESS": "localhost"}, "SAFETY_ADDRESS"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ServeSettings.from_env(env)


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


def test_compile_auto_means_cuda_only() -> None:
    from service.server import compile_wanted

    assert not compile_wanted("auto", "cpu")
    assert compile_wanted("auto", "cuda") and compile_wanted("auto", "cuda:1")
    assert compile_wanted("on", "cpu") and not compile_wanted("off", "cuda")
    assert ServeSettings.from_env({}).compile == "auto"
    assert ServeSettings.from_env({"SAFETY_COMPILE": "on"}).compile == "on"
