"""The schema is the migrations: up and down on PostgreSQL and SQLite, and the models match."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.dialects.postgresql import JSONB

from jobs.db import make_engine, transaction
from jobs.migrate import downgrade, upgrade
from jobs.models import Base, Job
from jobs.settings import Settings
from jobs.submission import run_config_for
from trainer.config import GRPOConfig

TABLES = {
    "datasets",
    "jobs",
    "job_metrics",
    "checkpoints",
    "job_events",
    "job_samples",
    "api_keys",
    "idempotency_keys",
    "workers",
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


def test_a_job_stored_with_a_top_level_group_size_runs_with_it_from_its_hyperparameters(
    empty_database: str, tmp_path
) -> None:
    """0007: the old spec's top-level ``group_size`` (the one the job ran with, over one in its
    hyperparameters) moves inside them; ``run_config_for`` reads the row as it reads a new job's.
    Down again, the top level says it once more."""
    spec_type = sa.JSON().with_variant(JSONB(), "postgresql")
    old = {
        "name": "j",
        "base_model": "org/model",
        "dataset_id": "ds_1",
        "eval_dataset_id": None,
        "reward": [{"type": "exact_match"}],
        "group_size": 4,
        "hyperparameters": {"group_size": 2, "max_steps": 3},
        "webhook_url": None,
    }
    upgrade(empty_database, "0006")
    engine = make_engine(empty_database, pooled=False)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO datasets (id, owner, name, rows, bytes, sha256, fields, created_at) "
                "VALUES ('ds_1', 'local', 'd', 1, 1, 'x', '[]', CURRENT_TIMESTAMP)"
            )
        )
        for job_id, spec in (("job_1", old), ("job_2", {**old, "group_size": None})):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, owner, status, spec, base_model, dataset_id, max_steps, step, "
                    "attempts, cancel_requested, pause_requested, webhook_attempts, created_at, queued_at, "
                    "updated_at) "
                    "VALUES (:id, 'local', 'queued', :spec, 'org/model', 'ds_1', 3, 0, 0, false, false, 0, "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ).bindparams(sa.bindparam("spec", type_=spec_type)),
                {"id": job_id, "spec": spec},
            )

    def specs() -> dict[str, dict]:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, spec FROM jobs").columns(id=sa.String, spec=spec_type))
            return dict(rows.all())

    upgrade(empty_database)
    without_top_level = {key: value for key, value in old.items() if key != "group_size"}
    without_top_level["gpus"] = 1  # 0008: jobs made before asked for one device
    assert specs() == {
        "job_1": {**without_top_level, "hyperparameters": {"group_size": 4, "max_steps": 3}},
        "job_2": without_top_level,  # a null top level said nothing: the hyperparameters' own stands
    }
    settings = Settings(data_dir=tmp_path, database_url=empty_database)
    with transaction(empty_database) as session:
        run = run_config_for(session.get(Job, "job_1"), settings)
    assert (run.hyperparameters.group_size, run.hyperparameters.max_steps) == (4, 3)
    assert run.hyperparameters.beta == GRPOConfig().beta  # left out when posted: the default
    assert run.reward == old["reward"] and run.dataset == str(settings.dataset_path("ds_1").resolve())

    downgrade(empty_database, "0006")
    assert specs() == {
        "job_1": {**old, "hyperparameters": {"group_size": 4, "max_steps": 3}},
        "job_2": {**old, "group_size": 2},
    }
    engine.dispose()


def test_jobs_made_before_devices_ask_for_one_and_the_columns_go_with_the_jobs_kept(
    empty_database: str,
) -> None:
    """0008: an existing job asks for one device, in its spec and its column, and has run on none
    recorded; down again, the spec and the table are as 0007 left them."""
    spec_type = sa.JSON().with_variant(JSONB(), "postgresql")
    spec = {"name": "j", "base_model": "org/model", "dataset_id": "ds_1", "hyperparameters": {"max_steps": 3}}
    upgrade(empty_database, "0007")
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
                "INSERT INTO jobs (id, owner, status, spec, base_model, dataset_id, max_steps, step, "
                "attempts, cancel_requested, pause_requested, webhook_attempts, created_at, queued_at, "
                "updated_at) "
                "VALUES ('job_1', 'local', 'succeeded', :spec, 'org/model', 'ds_1', 3, 3, 1, false, false, "
                "0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ).bindparams(sa.bindparam("spec", type_=spec_type)),
            {"spec": spec},
        )

    def rows() -> list[tuple]:
        columns = {"spec": spec_type, "gpus": sa.Integer, "devices": spec_type}
        available = {column["name"] for column in inspect(engine).get_columns("jobs")}
        names = [name for name in columns if name in available]
        with engine.connect() as connection:
            query = text(f"SELECT {', '.join(names)} FROM jobs").columns(**{n: columns[n] for n in names})
            return [tuple(row) for row in connection.execute(query)]

    upgrade(empty_database)
    assert rows() == [({**spec, "gpus": 1}, 1, None)]
    assert "workers" in inspect(engine).get_table_names()
    downgrade(empty_database, "0007")
    assert rows() == [(spec,)]
    assert "workers" not in inspect(engine).get_table_names()
    engine.dispose()
