"""The schema is the migrations: up and down on PostgreSQL and SQLite, and the models match."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from jobs.db import make_engine
from jobs.migrate import downgrade, upgrade
from jobs.models import Base

TABLES = {
    "datasets",
    "jobs",
    "job_metrics",
    "checkpoints",
    "job_events",
    "job_samples",
    "api_keys",
    "idempotency_keys",
}


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database(request: pytest.FixtureRequest, make_database, tmp_path) -> str:
    if request.param == "postgresql":
        return make_database(migrate=False)
    return f"sqlite:///{tmp_path / 'grpo.db'}"


def test_upgrade_matches_models_and_downgrade_removes_everything(empty_database: str) -> None:
    engine = make_engine(empty_database, pooled=False)

    upgrade(empty_database)
    assert TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"

    downgrade(empty_database)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

    upgrade(empty_database)  # and up again from nothing
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_rows_made_before_owners_belong_to_the_local_owner_and_keep_their_idempotency_key(
    make_database,
) -> None:
    url = make_database(migrate=False)
    upgrade(url, "0002")
    engine = make_engine(url, pooled=False)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO datasets (id, name, rows, bytes, sha256, fields, created_at) "
                "VALUES ('ds_1', 'd', 1, 1, 'x', '[]', now())"
            )
        )
        connection.execute(
            text(
                "INSERT INTO jobs (id, status, spec, base_model, dataset_id, max_steps, step, attempts, "
                "cancel_requested, pause_requested, idempotency_key, request_hash, created_at, queued_at, "
                "updated_at) VALUES ('job_1', 'queued', '{}', 'm', 'ds_1', 1, 0, 0, false, false, "
                "'retry-me', 'h', now(), now(), now())"
            )
        )
    upgrade(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT owner FROM datasets")).scalars().all() == ["local"]
        assert connection.execute(text("SELECT owner FROM jobs")).scalars().all() == ["local"]
        assert connection.execute(
            text("SELECT owner, endpoint, key, request_hash, resource_id FROM idempotency_keys")
        ).all() == [("local", "POST /v1/jobs", "retry-me", "h", "job_1")]
    engine.dispose()


def test_webhook_delivery_columns_come_and_go_with_the_jobs_kept(empty_database: str) -> None:
    upgrade(empty_database, "0003")
    engine = make_engine(empty_database, pooled=False)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO datasets (id, owner, name, rows, bytes, sha256, fields, created_at) "
                "VALUES ('ds_1', 'local', 'd', 1, 1, 'x', '[]', CURRENT_TIMESTAMP)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO jobs (id, owner, status, spec, base_model, dataset_id, webhook_url, max_steps, "
                "step, attempts, cancel_requested, pause_requested, created_at, queued_at, updated_at) "
                "VALUES ('job_1', 'local', 'succeeded', '{}', 'm', 'ds_1', 'https://hooks.example.com/', "
                "1, 1, 1, false, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
    upgrade(empty_database)
    with engine.connect() as connection:  # a job that ended before webhooks were sent is not sent one now
        assert connection.execute(
            text("SELECT webhook_status, webhook_attempts, webhook_due_at FROM jobs")
        ).all() == [(None, 0, None)]
    downgrade(empty_database, "0003")
    assert "webhook_status" not in {column["name"] for column in inspect(engine).get_columns("jobs")}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id, status FROM jobs")).all() == [("job_1", "succeeded")]
    engine.dispose()
