"""Service test fixtures: throwaway PostgreSQL databases built by the migrations, the API on
them, and real worker processes on Redis (keys and queue unique to the test run)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.main import create_app
from jobs.db import get_engine
from jobs.migrate import upgrade
from jobs.models import Base
from jobs.settings import Settings
from tests.service.factories import RUN_ID, WorkerProcess, api_key, bearer
from tests.service.s3 import S3Server, running_s3_server

ADMIN_URL = os.environ.get("GRPO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GRPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _admin(sql: str) -> None:
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as connection:
            connection.execute(sql)
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"the service tests need PostgreSQL at {ADMIN_URL} (GRPO_TEST_POSTGRES_URL): {exc}"
        ) from exc


@pytest.fixture(scope="session")
def make_database() -> Iterator:
    """``make_database(migrate=True)`` → the URL of a fresh database, dropped after the session."""
    names: list[str] = []

    def make(*, migrate: bool = True) -> str:
        name = f"grpo_test_{RUN_ID}_{len(names)}"
        _admin(f'CREATE DATABASE "{name}"')
        names.append(name)
        url = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
        if migrate:
            upgrade(url)
        return url

    yield make
    for name in names:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def api_database_url(make_database) -> str:
    return make_database()


@pytest.fixture
def api_database(api_database_url: str) -> Iterator[str]:
    """The API tests' PostgreSQL database, emptied after each test."""
    yield api_database_url
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with get_engine(api_database_url).begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} CASCADE"))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """GRPO_MODEL_DIRS of the tests' servers: pytest's base temporary directory, where the tiny
    models live (each server's artifact store, under it too, stays refused)."""
    return [tmp_path_factory.getbasetemp()]


@pytest.fixture
def settings(api_database: str, tmp_path: Path, model_dirs: list[Path]) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=api_database,
        broker_url=REDIS_URL,
        broker_key_prefix=f"grpo-test-{RUN_ID}:",
        queue=f"gpu-{RUN_ID}",
        model_dirs=model_dirs,
    )


@pytest.fixture
def sent() -> list[str]:
    """Job ids the API handed to the broker (API tests stop at the broker boundary)."""
    return []


@pytest.fixture
def client(settings: Settings, sent: list[str]) -> Iterator[TestClient]:
    """The API, called with an API key of the owner ``alice``."""
    with TestClient(create_app(settings, send=sent.append), headers=bearer(api_key(settings))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), hidden_size=32, num_heads=2)


@pytest.fixture(scope="module")
def redis_worker_settings(
    make_database, tmp_path_factory: pytest.TempPathFactory, model_dirs: list[Path]
) -> Settings:
    """Settings of an end-to-end setup: its own database, Redis keys and queue, short leases; the
    operator lets jobs call loopback, where the tests' scoring endpoints and webhook receivers listen."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        data_dir=tmp_path_factory.mktemp("e2e"),
        database_url=make_database(),
        broker_url=REDIS_URL,
        broker_key_prefix=f"grpo-test-{tag}:",
        queue=f"gpu-{tag}",
        heartbeat_interval_s=0.5,
        heartbeat_stale_s=4,
        sweep_interval_s=1,
        send_grace_s=2,
        allow_private_hosts=["127.0.0.1"],
        model_dirs=model_dirs,
    )


@pytest.fixture(scope="module")
def redis_worker(redis_worker_settings: Settings) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(redis_worker_settings)
    worker.start()
    yield worker
    worker.stop()
    worker.forget_broker_keys()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (SeaweedFS) for the session; each test's store takes a prefix of
    its own in the one bucket (``S3Server.settings``)."""
    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server
