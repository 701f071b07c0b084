"""Settings, the Celery configuration that makes redelivery safe, the worker command line, import hygiene."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from model.errors import ConfigError
from worker.app import TASK_NAME, create_app
from worker.cli import default_pool, register, worker_argv
from worker.settings import WorkerSettings, settings_table


def test_defaults_match_the_shared_setting_names() -> None:
    s = WorkerSettings.from_env({})
    assert (s.redis_url, s.queue, s.chunk_size, s.result_ttl_s, s.max_attempts, s.visibility_timeout_s) == (
        "redis://localhost:6379/0", "safety.classify", 256, 604_800, 3, 3600,
    )  # fmt: skip
    names = [env for env, _, _ in settings_table()]
    shared = ["SAFETY_REDIS_URL", "SAFETY_QUEUE", "SAFETY_CHUNK_SIZE", "SAFETY_RESULT_TTL_S",
              "SAFETY_MAX_ATTEMPTS", "SAFETY_VISIBILITY_TIMEOUT_S", "SAFETY_WORKER_CONCURRENCY"]  # fmt: skip
    for name in shared:
        assert name in names


def test_environment_is_parsed_and_bad_values_name_the_variable() -> None:
    s = WorkerSettings.from_env(
        {"SAFETY_CHUNK_SIZE": "10", "SAFETY_WORKER_CONCURRENCY": "auto", "SAFETY_QUEUE": ""}
    )
    assert (s.chunk_size, s.concurrency, s.queue) == (10, None, "safety.classify")
    with pytest.raises(ConfigError, match=r"SAFETY_MAX_ATTEMPTS.*positive"):
        WorkerSettings.from_env({"SAFETY_MAX_ATTEMPTS": "0"})
    with pytest.raises(ConfigError, match=r"SAFETY_CHUNK_SIZE.*cannot parse 'many'"):
        WorkerSettings.from_env({"SAFETY_CHUNK_SIZE": "many"})
    with pytest.raises(ConfigError, match="SAFETY_REDIS_URL"):
        WorkerSettings.from_env({"SAFETY_REDIS_URL": "localhost:6379"})


def test_metrics_port_defaults_to_9101_and_0_turns_it_off() -> None:
    assert WorkerSettings.from_env({}).metrics_port == 9101
    assert WorkerSettings.from_env({"SAFETY_WORKER_METRICS_PORT": "0"}).metrics_port == 0
    assert ("SAFETY_WORKER_METRICS_PORT", "9101") in [(env, default) for env, default, _ in settings_table()]
    for bad, why in (("70000", "a port number"), ("-1", "a port number"), ("x", "cannot parse")):
        with pytest.raises(ConfigError, match=f"SAFETY_WORKER_METRICS_PORT.*{why}"):
            WorkerSettings.from_env({"SAFETY_WORKER_METRICS_PORT": bad})


def test_celery_is_json_only_late_ack_and_one_visibility_timeout() -> None:
    conf = create_app(WorkerSettings(visibility_timeout_s=120, queue="q1")).conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 120
    assert conf.result_backend_transport_options["visibility_timeout"] == 120
    # the unacked sweep runs often enough to honour the timeout (kombu's default is every 100 s)
    assert (
        conf.broker_transport_options["unacked_restore_interval"]
        * conf.broker_transport_options["unacked_restore_throttle"]
        <= 12
    )
    # its lock, left by a worker killed while sweeping, must not freeze the sweep for kombu's 300 s
    assert conf.broker_transport_options["unacked_mutex_expire"] == 120
    assert (
        create_app(WorkerSettings(visibility_timeout_s=2)).conf.broker_transport_options[
            "unacked_mutex_expire"
        ]
        == 5
    )
    assert conf.task_routes[TASK_NAME] == {"queue": "q1"}


def test_pickle_is_refused_by_the_worker_app() -> None:
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import dumps, loads

    conf = create_app(WorkerSettings()).conf
    content_type, encoding, payload = dumps({"a": 1}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(payload, content_type, encoding, accept=conf.accept_content)


def test_pool_is_solo_on_cuda_and_prefork_on_cpu() -> None:
    assert default_pool("cuda") == default_pool("cuda:1") == "solo"
    assert default_pool("cpu") == "prefork"
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["worker", "-c", "3"])
    argv = worker_argv(args, WorkerSettings(device="cpu", queue="jobs"))
    assert {"--pool=prefork", "--concurrency=3", "--queues=jobs"} <= set(argv)
    argv = worker_argv(parser.parse_args(["worker", "-c", "3"]), WorkerSettings(device="cuda"))
    assert {"--pool=solo", "--concurrency=1"} <= set(argv)
    assert f"--hostname=safety-{os.getpid()}@%h" in argv  # not Celery's celery@HOSTNAME, shared on a host
    argv = worker_argv(parser.parse_args(["worker", "-n", "w1@%h", "--loglevel", "debug"]), WorkerSettings())
    assert "--loglevel=DEBUG" in argv
    with pytest.raises(SystemExit):  # refused by the parser, not a traceback from logging's setup
        parser.parse_args(["worker", "--loglevel", "verbose"])
    assert [a for a in argv if a.startswith("--hostname")] == ["--hostname=w1@%h"]


def test_the_safety_command_discovers_the_batch_subcommands() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="safety.commands")}
    assert {name: eps.get(name) for name in ("worker", "submit", "job")} == {
        "worker": "worker.cli:register_worker",
        "submit": "worker.cli:register_submit",
        "job": "worker.cli:register_job",
    }
    out = subprocess.run(
        [sys.executable, "-m", "model.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("worker", "submit", "job", "train", "eval", "serve"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "argv", [["job", "status", "x"], ["--log-level", "INFO", "submit", "in.jsonl"], ["worker", "-c", "2"]]
)
def test_the_batch_commands_start_without_torch(argv: list[str]) -> None:
    """Only the named command's entry point loads: `safety job status` must not pay for torch (~3 s)."""
    code = f"import sys; from model.cli import build_parser; build_parser({argv!r}).parse_args({argv!r}); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _imports_torch(module: str) -> bool:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("module", ["worker.jobs", "worker.app", "worker.tasks", "worker.cli"])
def test_the_client_and_the_worker_parent_do_not_import_torch(module: str) -> None:
    assert not _imports_torch(module)


def test_worker_threads_env_splits_cpus_and_leaves_gpus_to_the_engine() -> None:
    """The prefork parent sets OMP_NUM_THREADS for its children on a CPU, without importing torch (which would
    initialise CUDA before the fork on a GPU host); on a GPU it sets nothing: the engine takes 1 there."""
    code = (
        "import sys; from worker.cli import torch_threads_env; cpu, gpu = {}, {}; "
        "torch_threads_env('cpu', ['worker', '--pool=prefork', '--concurrency=2'], cpu); "
        "torch_threads_env('cuda:1', ['worker', '--pool=solo', '--concurrency=1'], gpu); "
        "print('torch' in sys.modules, cpu.get('OMP_NUM_THREADS'), gpu)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from model.threads import available_cpus

    assert out.stdout.split() == ["False", str(max(1, available_cpus() // 2)), "{}"]
