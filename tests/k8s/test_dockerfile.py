"""The Dockerfile's commands are the ones the package installs (no image can be built here).

Owns: parsing the Dockerfile and .dockerignore, and checking them against pyproject.toml's console script
and `safety.commands` entry points, the Makefile's torch pin, the settings' default ports and the manifests'
user and commands. Must not know: what the subcommands do.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import tomllib
from typing import Any

import pytest

from service.settings import ServeSettings, split_address
from tests.k8s.render import REPO, Rendered
from worker.settings import WorkerSettings

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
COMMANDS: dict[str, str] = PYPROJECT["project"]["entry-points"]["safety.commands"]
IMAGE_COMMANDS = ("serve", "worker")  # what the image and the manifests run


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def only(name: str) -> list[str]:
    """The exec-form (JSON) arguments of the last `name` instruction (the runtime stage's)."""
    found = [rest for word, rest in instructions() if word == name]
    assert found, f"Dockerfile has no {name}"
    value = json.loads(found[-1])
    assert isinstance(value, list), f"{name} must use the exec (JSON) form so signals reach the server"
    return value


def arg_default(name: str) -> str:
    (value,) = [
        rest.partition("=")[2]
        for word, rest in instructions()
        if word == "ARG" and rest.startswith(name + "=")
    ]
    return value.strip('"')


def resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_entrypoint_is_the_console_script() -> None:
    (script,) = only("ENTRYPOINT")
    assert script in SCRIPTS, f"ENTRYPOINT {script!r} is not a [project.scripts] entry: {sorted(SCRIPTS)}"
    assert callable(resolve(SCRIPTS[script]))


@pytest.mark.parametrize("command", IMAGE_COMMANDS)
def test_image_commands_are_registered_subcommands(command: str) -> None:
    assert command in COMMANDS, (
        f"`safety {command}` is run by the image and the manifests but pyproject.toml's "
        f'[project.entry-points."safety.commands"] has only {sorted(COMMANDS)}'
    )
    register = resolve(COMMANDS[command])
    parser = argparse.ArgumentParser(prog="safety")
    subparsers = parser.add_subparsers(dest="command")
    register(subparsers)
    assert command in subparsers.choices, f"{COMMANDS[command]} did not add the subcommand {command!r}"
    assert callable(subparsers.choices[command].get_default("func")), "the subcommand sets no func"


def test_cmd_and_build_checks_name_registered_subcommands() -> None:
    (default,) = only("CMD")
    assert default in IMAGE_COMMANDS
    # The build runs `safety <command> --help` for each command; every one must be an image command.
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    checked = set(re.findall(r"(?:^|&&|;)\s*safety\s+([a-z][\w-]*)", runs))
    assert checked == set(IMAGE_COMMANDS), f"the build smoke-tests {checked}, the image runs {IMAGE_COMMANDS}"


def test_manifests_run_the_image_commands(rendered: dict[str, Rendered]) -> None:
    (script,) = only("ENTRYPOINT")
    for r in rendered.values():
        for workload in r.workloads():
            for c in workload["spec"]["template"]["spec"]["containers"]:
                if "safety-classifier" in c["image"]:
                    assert "command" not in c, (
                        "keep the image's ENTRYPOINT (`safety`); pass the subcommand as args"
                    )
                    assert c["args"][0] in IMAGE_COMMANDS, f"{r.name}: `{script} {c['args'][0]}`"


def test_manifest_args_parse_with_the_real_cli(rendered: dict[str, Rendered]) -> None:
    """Every container's args parse with the subcommands' own parsers (a misspelled flag fails here)."""
    parser = argparse.ArgumentParser(prog="safety", exit_on_error=False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in IMAGE_COMMANDS:
        resolve(COMMANDS[command])(subparsers)
    for r in rendered.values():
        for workload in r.workloads():
            for c in workload["spec"]["template"]["spec"]["containers"]:
                if "safety-classifier" in c["image"]:
                    try:
                        args = parser.parse_args(c["args"])
                    except (argparse.ArgumentError, SystemExit) as e:
                        pytest.fail(
                            f"{r.name} {workload['metadata']['name']}: `safety {' '.join(c['args'])}`: {e}"
                        )
                    assert args.command == c["args"][0]


def test_runs_as_the_manifests_user(rendered: dict[str, Rendered]) -> None:
    users = [rest for word, rest in instructions() if word == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 10000, "a numeric non-root UID (runAsNonRoot can verify it)"
    for r in rendered.values():
        for workload in r.workloads():
            sc = workload["spec"]["template"]["spec"]["securityContext"]
            assert (sc["runAsUser"], sc["runAsGroup"]) == (int(uid), int(gid or uid)), workload["metadata"][
                "name"
            ]


def test_exposes_the_default_ports() -> None:
    """The server's gRPC and metrics ports and the worker's metrics port, and nothing else."""
    (exposed,) = [rest.split() for word, rest in instructions() if word == "EXPOSE"]
    defaults = {split_address(getattr(ServeSettings(), f))[1] for f in ("address", "metrics_address")}
    defaults.add(str(WorkerSettings().metrics_port))
    assert len(exposed) == len(set(exposed)), f"EXPOSE repeats a port: {exposed}"
    assert set(exposed) == defaults


def test_torch_is_pinned_like_the_makefile() -> None:
    make_pin = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert arg_default("TORCH_VERSION") == make_pin
    assert arg_default("TORCH_VARIANT") == "cpu", "the default build is the CPU wheel"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in (REPO / "Dockerfile").read_text()
    assert arg_default("FLASH_ATTN") == "", "flash-attn is optional (off by default)"


def test_build_context_carries_the_package() -> None:
    """The allow-list .dockerignore lets in every COPY source, the bundled model and the .proto."""
    lines = [
        x.strip()
        for x in (REPO / ".dockerignore").read_text().splitlines()
        if x.strip() and not x.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allow-list"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    excluded = [x for x in lines[1:] if not x.startswith("!")]
    copies = [shlex.split(rest) for word, rest in instructions() if word == "COPY" and "--from=" not in rest]
    sources = {src.rstrip("/") for args in copies for src in args[:-1]}
    assert sources <= allowed, f"COPY sources left out of the build context: {sources - allowed}"
    assert {"model", "proto", "service", "worker", "pyproject.toml", "setup.py"} <= sources
    assert "default/*" in PYPROJECT["tool"]["setuptools"]["package-data"]["model"], "the bundled model ships"
    assert not any(x.startswith(("model", "**/default")) for x in excluded), (
        "the bundled model must not be excluded"
    )


def test_the_cuda_runtime_image_can_build_triton_launchers() -> None:
    """SAFETY_COMPILE=auto compiles on CUDA; Triton builds its CUDA driver module (driver.c) with a C compiler
    and Python.h at first use, in every fresh pod (its cache is the /tmp emptyDir)."""
    steps = instructions()
    runtime = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    run = " ".join(rest for word, rest in runtime if word == "RUN")
    assert ("ARG", "TORCH_VARIANT") in runtime, "the runtime stage must see the variant"
    assert 'if [ "${TORCH_VARIANT}" != cpu ]' in run and "gcc" in run and "libc6-dev" in run
    assert "python3-dev" in run  # Python.h on a CUDA (Ubuntu) base; the python images have it


def test_the_runtime_image_caps_glibc_malloc_arenas() -> None:
    """Measured (docs/benchmarks.md): two arenas keep large requests' memory from lingering in per-thread
    arenas at no throughput cost; the runtime stage's ENV sets it for serve and worker alike."""
    steps = instructions()
    runtime = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert re.search(r"(^|\s)MALLOC_ARENA_MAX=2(\s|$)", env), env
