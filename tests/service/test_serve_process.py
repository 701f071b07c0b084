"""`safety serve` as a real process: JSON logs, `safety classify --remote` against it, SIGTERM -> exit 0."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service.processes import safety_command, serve_process


@pytest.mark.slow
def test_serve_classify_remote_and_sigterm(tiny_model_dir: Path) -> None:
    env = {**os.environ, "SAFETY_LOG_FORMAT": "json", "SAFETY_METRICS_ADDRESS": "off", "SAFETY_DEVICE": "cpu"}
    args = ["--model", str(tiny_model_dir), "--address", "127.0.0.1:0", "--drain-grace-s", "5"]
    with serve_process(args, env) as served:
        port = served.log("listening")["port"]
        served.log("serving")
        out = subprocess.run(
            [*safety_command(), "classify", "--remote", f"127.0.0.1:{port}", "How do I bake bread?",
             "--threshold", "hate=0.99"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        [result] = [json.loads(line) for line in out.stdout.splitlines()]
        assert set(result) >= {
            "id",
            "scores",
            "logits",
            "flagged",
            "flagged_labels",
            "tokens",
            "windows",
            "spans",
        }
        assert "hate" in result["scores"] and "hate" not in result["flagged_labels"]
        served.stop()


def test_attention_setting_reaches_the_engine(tiny_model_dir: Path) -> None:
    """SAFETY_ATTENTION picks the kernel: forcing CUDA's varlen kernel on the CPU fails start-up, by name."""
    env = {**os.environ, "SAFETY_LOG_FORMAT": "text", "SAFETY_METRICS_ADDRESS": "off", "SAFETY_DEVICE": "cpu",
           "SAFETY_ATTENTION": "varlen"}  # fmt: skip
    cmd = [*safety_command(), "serve", "--model", str(tiny_model_dir), "--address", "127.0.0.1:0"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "startup failed: backend: 'varlen' needs a CUDA device" in res.stderr + res.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--device", "tpu"], {}, "--device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ([], {"SAFETY_DEVICE": "tpu"}, "SAFETY_DEVICE: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--dtype", "float8"], {}, "--dtype: must be float32, bfloat16 or float16"),
        (["--address", "127.0.0.1:99999"], {}, "--address: must be HOST:PORT with a port in 0-65535"),
        (["--max-items", "0"], {}, "--max-items: must be a positive integer, got 0"),
        ([], {"SAFETY_MAX_ITEMS": "abc"}, "SAFETY_MAX_ITEMS: cannot parse 'abc': expected an integer"),
        ([], {"SAFETY_DRAIN_GRACE_S": "nan"}, "SAFETY_DRAIN_GRACE_S: must be a finite number"),
        ([], {"SAFETY_API_KEY": "k1 secret"}, "SAFETY_API_KEY: key 1 contains whitespace"),
        ([], {"SAFETY_API_KEY": "k1\u00a0"}, "SAFETY_API_KEY: key 1 has a character that is not printable"),
        (["--api-key-file", "/nonexistent/keys"], {}, "--api-key-file: /nonexistent/keys: cannot read"),
        # the job RPCs' settings are checked at start-up too, a Redis URL's credentials masked
        (
            [],
            {"SAFETY_REDIS_URL": "http://user:hunter2@redis:6379/0"},
            "environment: field 'SAFETY_REDIS_URL': must be a redis://, rediss:// or unix:// URL, got "
            "'http://***@redis:6379/0'\n",
        ),
        (
            [],
            {"SAFETY_REDIS_URL": "redis://default:Zx9kQ2mB/pL8=@127.0.0.1:41333/0"},
            "environment: field 'SAFETY_REDIS_URL': is not a URL redis-py can read "
            "('redis://***@127.0.0.1:41333/0'): percent-encode any '/', '#', '?', '@' or ':'",
        ),
        (
            [],
            {"SAFETY_CHUNK_SIZE": "0"},
            "environment: field 'SAFETY_CHUNK_SIZE': must be a positive integer",
        ),
    ],
    ids=[
        "device",
        "device-env",
        "dtype",
        "port",
        "max-items",
        "max-items-env",
        "nan",
        "api-key",
        "api-key-not-ascii",
        "api-key-file",
        "redis-url",
        "redis-url-slash",
        "chunk-size",
    ],
)
def test_a_bad_setting_exits_2_with_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    cmd = [*safety_command(), "serve", "--address", "127.0.0.1:0", "--metrics-address", "off", *args]
    res = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith(f"safety serve: {message}"), res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and not res.stdout  # one line, no traceback


def test_a_flag_wins_over_the_variable_in_the_job_settings_check(tiny_model_dir: Path) -> None:
    """`safety serve --log-format json` with SAFETY_LOG_FORMAT=logfmt: the flag wins, and the start-up
    check of the job settings (which share SAFETY_LOG_FORMAT, SAFETY_DRAIN_GRACE_S, the engine's, ...) must
    not read the variable again and exit 2 on it."""
    env = {**os.environ, "SAFETY_LOG_FORMAT": "logfmt", "SAFETY_DRAIN_GRACE_S": "nan", "SAFETY_DEVICE": "tpu",
           "SAFETY_METRICS_ADDRESS": "off"}  # fmt: skip
    args = ["--model", str(tiny_model_dir), "--address", "127.0.0.1:0", "--log-format", "json",
            "--drain-grace-s", "5", "--device", "cpu"]  # fmt: skip
    with serve_process(args, env) as served:
        served.log("serving")
        served.stop()


def test_start_up_failures_of_the_host_are_one_line_without_a_traceback(tiny_model_dir: Path) -> None:
    """A taken metrics port (named, before the model loads), a model path that is not a checkpoint (named by
    its setting) and --device cuda without CUDA: exit 1."""
    import torch

    base = [*safety_command(), "serve", "--model", str(tiny_model_dir), "--address", "127.0.0.1:0"]
    env = {**os.environ, "SAFETY_LOG_FORMAT": "text"}
    cases = [
        (["--metrics-address", "127.0.0.1:{taken}"], "SAFETY_METRICS_ADDRESS 127.0.0.1:{taken}: cannot bind"),
        (
            ["--metrics-address", "off", "--model", "/nonexistent"],
            "--model or SAFETY_MODEL: /nonexistent: not a",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append((["--metrics-address", "off", "--device", "cuda"], "CUDA is not available"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in cases:
            cmd = [*base, *(a.format(taken=port) for a in args)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            output = res.stderr + res.stdout
            assert res.returncode == 1 and "Traceback" not in output, output[-3000:]
            [failed] = [line for line in output.splitlines() if "startup failed" in line]
            assert message.format(taken=port) in failed, output[-3000:]


def test_classify_remote_with_an_unreadable_ca_names_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    cmd = [*safety_command(), "classify", "--remote", "127.0.0.1:1", "--tls", "--ca", str(missing), "hi"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr == (
        f"safety classify: --ca: cannot read the CA certificate {missing} (No such file or directory)\n"
    )
    cmd = [*cmd[:-4], "--client-cert", str(missing), "--client-key", str(missing), "hi"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("safety classify: --client-key: cannot read the client key"), res.stderr
    res = subprocess.run([*cmd[:-3], "hi"], capture_output=True, text=True, timeout=120)  # no --client-key
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        res.stderr
        == "safety classify: --client-key: a client certificate needs both --client-cert and --client-key\n"
    )


def test_grpc_cores_own_log_lines_stay_out_of_the_json_log(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A plaintext connection to a TLS port made gRPC core log `I1127 ... ssl_transport_security.cc ...
    Handshake failed` in its own format: `safety serve` defaults GRPC_VERBOSITY to ERROR."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    env.update(SAFETY_LOG_FORMAT="json", SAFETY_METRICS_ADDRESS="off", SAFETY_DEVICE="cpu")
    args = ["--model", str(tiny_model_dir), "--address", "127.0.0.1:0", "--tls-cert", str(cert),
            "--tls-key", str(key), "--drain-grace-s", "1"]  # fmt: skip
    with serve_process(args, env) as served:
        serving = served.log("serving")
        assert serving["tls"] is True and serving["auth"] == "off"
        port = next(r["port"] for r in served.seen if r.get("msg") == "listening")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the server refused the handshake
        served.stop()
    served.reader.join(10)  # the process has exited: its stderr is at its end
    rest = [served.lines.get() for _ in range(served.lines.qsize())]
    plain = [r["raw"] for r in served.seen if "raw" in r] + [
        line for line in rest if not line.startswith("{")
    ]
    assert not plain, f"lines that are not JSON: {plain}"
