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
        # a password holding '@' or ':' (redis-py takes them: the host is after the last '@')
        ("redis://default:s3cr@t-hunter2@redis:6379/0", "redis://***@redis:6379/0"),
        # one holding '/', '#' or '?' redis-py cannot read (the settings refuse it), but it is masked
        ("redis://u:hunt/er2@redis:6379/0", "redis://***@redis:6379/0"),
        ("redis://u:hunt#er2@redis:6379/0", "redis://***@redis:6379/0"),
        # redis-py also reads a password from the query: every query value is masked, the keys kept
        ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=***&password=***"),
        (
            "redis://redis/0?PASSWORD=hunter2&health_check_interval=2",
            "redis://redis/0?PASSWORD=***&health_check_interval=***",
        ),
        ("redis://redis/0?password=wrong;hunter2", "redis://redis/0?password=***"),
        ("redis://redis/0?pass%77ord=hunter2x", "redis://redis/0?pass%77ord=***"),
        ("redis://redis/0?hunter2&db=1#hunter2", "redis://redis/0?***&db=***#***"),
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


ENCODE = "percent-encode any '/', '#', '?', '@' or ':' in the user name or password"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # redis-py and kombu end the password at its first '/', '#' or '?': the rest is a "port"
        ("redis://default:Zx9kQ2mB/hunter2=@127.0.0.1:41333/0", "not a URL redis-py can read"),
        ("redis://u:Zx9#hunter2@127.0.0.1:41333/0", "not a URL redis-py can read"),
        ("redis://u:Zx9?hunter2@127.0.0.1:41333/0", "not a URL redis-py can read"),
        ("redis://:Zx9/hunter2@127.0.0.1:41333/0", "not a URL redis-py can read"),
        ("redis://127.0.0.1:99999/0", "not a URL redis-py can read"),
        # ... or, worse, a host and a port, and the rest a path: no password sent at all
        ("redis://u:123/hunter2@127.0.0.1:41333/0", "has an '@' after its first '/', '#' or '?'"),
    ],
)
def test_a_password_redis_py_would_misread_is_refused(url: str, says: str) -> None:
    """Accepted by the settings, such a URL failed every use with redis-py's `ValueError: Port could not be
    cast to integer value as 'Zx9kQ2mB'` (a traceback showing the password's start)."""
    with pytest.raises(ConfigError) as err:
        WorkerSettings.from_env({"SAFETY_REDIS_URL": url})
    message = str(err.value)
    assert "field 'SAFETY_REDIS_URL'" in message and says in message and ENCODE in message, message
    assert SECRET not in message and "Zx9" not in message, message
    encoded = url.replace("/hunter2", "%2Fhunter2").replace("#", "%23").replace("?", "%3F")
    if "99999" not in url:  # percent-encoded, the same password is accepted
        assert WorkerSettings.from_env({"SAFETY_REDIS_URL": encoded}).redis_url == encoded


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?password=hunter2",
        "redis://:x@127.0.0.1:6379/0?pass%77ord=hunter2",
        "unix:///run/redis.sock?db=0&PASSWORD=hunter2",
    ],
)
def test_a_password_in_the_query_is_refused(url: str) -> None:
    """redis-py reads it, but Celery's broker (kombu) fails on it inside `safety worker`: `TypeError: dict()
    got multiple values for keyword argument 'password'`."""
    with pytest.raises(ConfigError) as err:
        WorkerSettings.from_env({"SAFETY_REDIS_URL": url})
    message = str(err.value)
    assert "field 'SAFETY_REDIS_URL'" in message and "password in its query" in message, message
    assert "user info" in message and SECRET not in message, message


def test_a_url_redis_py_refuses_is_a_config_error_of_the_job_client() -> None:
    """The settings cannot know every parameter redis-py checks: its ValueError (which may quote part of
    the URL) becomes a ConfigError naming the variable, the URL masked."""
    url = "redis://:hunter2@127.0.0.1:6379/0?db=hunter2"
    with pytest.raises(ConfigError) as err:
        JobClient(WorkerSettings(redis_url=url))
    message = str(err.value)
    assert "field 'SAFETY_REDIS_URL'" in message and "redis://***@127.0.0.1:6379/0?db=***" in message, message
    assert SECRET not in message, message


def test_the_cli_refuses_a_password_with_a_slash_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SAFETY_REDIS_URL", "redis://default:Zx9kQ2mB/pL8=@127.0.0.1:41333/0")
    assert main(["job", "status", "x"]) == 2
    out, err = capsys.readouterr()
    assert "field 'SAFETY_REDIS_URL'" in err and ENCODE in err and "Traceback" not in err, err
    assert "Zx9" not in out + err, err


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


def test_a_percent_encoded_password_reaches_redis(tmp_path: Path) -> None:
    """The form the refusals ask for works: redis-py decodes '%2F', '%23', '%3F' back."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        server.client().config_set("requirepass", "Zx9k/pL8=#?")
        client = JobClient(
            WorkerSettings(redis_url=f"redis://default:Zx9k%2FpL8%3D%23%3F@127.0.0.1:{server.port}/0")
        )
        try:
            client.ping()
        finally:
            client.close()
    finally:
        server.kill()


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


def test_the_settings_repr_redacts_the_redis_url() -> None:
    """A settings object in a log line or a traceback's locals must not carry the password."""
    settings = WorkerSettings(redis_url="redis://user:s3cret@redis.internal:6379/0?socket_timeout=5")
    shown = repr(settings)
    assert "s3cret" not in shown, shown
    assert "redis_url='redis://***@redis.internal:6379/0?socket_timeout=***'" in shown, shown
    assert shown.startswith("WorkerSettings(") and "chunk_size=256" in shown, shown
    assert settings.redis_url.startswith("redis://user:s3cret@")  # the value itself is untouched
