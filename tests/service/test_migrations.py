"""The schema is the migrations: up and down on PostgreSQL and SQLite, and the models match."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from jobs.db import make_engine
from jobs.migrate import downgrade, upgrade
from jobs.models import Base

TABLES = {"datasets", "jobs", "job_metrics", "checkpoints", "job_events", "job_samples"}


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
