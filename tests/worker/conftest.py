"""Fixtures of the worker tests: fresh Redis servers and worker subprocesses, always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.worker.harness import RedisServer, Spools, Worker, worker_env
from worker.jobs import JobClient
from worker.settings import WorkerSettings


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh `redis-server --save "" --appendonly no` on a free port, for one test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One fresh Redis for a module whose tests do not break it (they use distinct queues and job ids)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def start_worker(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Callable[..., Worker]]:
    """start_worker(redis_url, pool=..., concurrency=..., hostname=..., **settings) -> a running worker
    subprocess (`Worker`: hostname "" a unique node name, None the product's default)."""
    started: list[Worker] = []

    def start(
        redis_url: str,
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        hostname: str | None = "",
        **settings: Any,
    ) -> Worker:
        env = worker_env(redis_url, tiny_model_dir, **settings)
        log = tmp_path / f"worker{len(started)}.log"
        worker = Worker(env, log, pool=pool, concurrency=concurrency, hostname=hostname)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def job_client() -> Iterator[Callable[..., JobClient]]:
    """job_client(redis_url, **settings) -> a JobClient, closed after the test."""
    clients: list[JobClient] = []

    def make(redis_url: str, **settings: Any) -> JobClient:
        client = JobClient(WorkerSettings(redis_url=redis_url, **settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def spools(monkeypatch: pytest.MonkeyPatch) -> Spools:
    """The job spools made in this test (`Spools`): a test asserts they were all closed."""
    return Spools().install(monkeypatch)
