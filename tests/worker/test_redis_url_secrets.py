"""A Redis URL's credentials never reach a message: the settings' refusal of a URL, the job client's errors
(Redis refusing the credentials, unreachable), and what `safety job` and `safety submit` print. All go
through `worker.settings.redacted_url`. The gRPC side (a remote caller's FAILED_PRECONDITION, `safety
serve` at start-up) is tested in tests/service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model.errors import ConfigError, UnavailableError
from tests.worker.harness import RedisServer, free_port
from worker.cli import main
from worker.jobs import JobClient
from worker.settings import WorkerSettings, redacted_url

SECRET = "hunter2"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:hunter2@redis:6379/0", "redis://***@redis:6379/0"),
        ("rediss://default:hunter2@redis:6380/1", "rediss://***@redis:6380/1"),
        # a password holding '@', ':' or '/' (redis-py takes them: the host is after the last '@')
        ("redis://default:s3cr@t-hunter2@redis:6379/0", "redis://***@redis:6379/0"),
        ("redis://u:hunt/er2@redis:6379/0", "redis://***@redis:6379/0"),
        # redis-py also reads a password from the query
        ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
        (
            "redis://redis/0?PASSWORD=hunter2&health_check_interval=2",
            "redis://redis/0?PASSWORD=***&health_check_interval=2",
        ),
        ("hunter2", "***"),  # not a URL: maybe a password set in the wrong variable
    ],
)
def test_redacted_url_masks_every_credential(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://user:hunter2@redis:6379/0", "got 'http://***@redis:6379/0'"),
        ("hunter2", "got a value without a scheme (not shown: it may be a secret)"),
    ],
)
def test_a_refused_url_is_named_without_its_password(url: str, says: str) -> None:
    """The settings' refusal quoted the whole URL (`{redis_url!r}`), password included."""
    with pytest.raises(ConfigError) as err:
        WorkerSettings.from_env({"SAFETY_REDIS_URL": url})
    assert SECRET not in str(err.value) and says in str(err.value), str(err.value)


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis that requires a password other than the tests'."""
    server = RedisServer(tmp_path / "redis").start()
    server.client().config_set("requirepass", "the-right-one")
    yield server
    server.kill()


def test_the_job_clients_errors_never_show_the_password(locked_redis: RedisServer) -> None:
    """A password with an '@' in it: the old mask (`//[^@/]*@`) stopped at its first '@', and the rest of
    the password was in the message."""
    wrong = f"redis://default:s3cr@t-{SECRET}@127.0.0.1:{locked_redis.port}/0"
    client = JobClient(WorkerSettings(redis_url=wrong))
    try:
        with pytest.raises(ConfigError) as refused:
            client.status("some-job")
    finally:
        client.close()
    message = str(refused.value)
    assert "refused the credentials" in message and f"redis://***@127.0.0.1:{locked_redis.port}/0" in message
    assert SECRET not in message and "s3cr" not in message, message
    unreachable = JobClient(WorkerSettings(redis_url=f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(UnavailableError) as down:
            unreachable.status("some-job")
    finally:
        unreachable.close()
    assert "unreachable" in str(down.value) and SECRET not in str(down.value), str(down.value)


def test_the_cli_never_prints_the_password(
    locked_redis: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "one"}\n')
    urls = (
        f"redis://default:s3cr@t-{SECRET}@127.0.0.1:{locked_redis.port}/0",  # refused by Redis
        f"http://user:{SECRET}@127.0.0.1:{locked_redis.port}/0",  # refused by the settings
    )
    for url in urls:
        monkeypatch.setenv("SAFETY_REDIS_URL", url)
        for argv in (["job", "status", "x"], ["submit", str(items)], ["job", "results", "x"]):
            assert main(argv) == 2, (url, argv)
            out, err = capsys.readouterr()
            assert "field 'SAFETY_REDIS_URL'" in err, err
            assert SECRET not in out + err and "s3cr" not in out + err, (argv, err)
