"""Run the Alembic revisions from code (``grpo migrate``, the embedded launcher, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

# The revisions are installed with the code (a package beside this one), so `grpo migrate` works
# from an installed copy such as the Docker image's, not only from a checkout.
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()  # no alembic.ini: everything it would say is set here
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False  # leave the caller's logging alone
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
