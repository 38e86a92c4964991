"""Alembic environment: runs the revisions against GRPO_DATABASE_URL (or sqlalchemy.url)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from jobs.db import make_engine
from jobs.models import Base
from jobs.settings import get_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url(), pooled=False)
    with engine.connect() as connection:
        # batch mode: SQLite cannot ALTER most things, so Alembic copies the table instead
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
