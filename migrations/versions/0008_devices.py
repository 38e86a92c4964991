"""Devices: a job asks for ``gpus`` devices (its spec's top-level field, repeated in the ``gpus``
column for the sweeper's queries) and records the ``devices`` its run was given; training workers
say they are up, and how many devices they have, in ``workers``, which the API reads to refuse a
job no live worker can run. Jobs made before asked for one device: their specs say so now, as a
new job's does.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-14
"""

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from jobs.models import UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 500
JSON = sa.JSON().with_variant(JSONB(), "postgresql")
jobs = sa.table("jobs", sa.column("id", sa.String()), sa.column("spec", JSON))


def with_one_device(spec: dict[str, Any]) -> dict[str, Any]:
    return spec if "gpus" in spec else {**spec, "gpus": 1}


def without_devices(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the code before this revision stores it (its JobCreate has no ``gpus``)."""
    return {key: value for key, value in spec.items() if key != "gpus"}


def rewrite_specs(change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Every job's spec through ``change``, a batch of rows at a time in id order."""
    connection = op.get_bind()
    after = ""
    while True:
        rows = connection.execute(
            sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.id > after).order_by(jobs.c.id).limit(BATCH)
        ).all()
        for job_id, spec in rows:
            changed = change(spec)
            if changed != spec:
                connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(spec=changed))
        if len(rows) < BATCH:
            return
        after = rows[-1][0]


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    )
    # batch mode: SQLite cannot ALTER most things, so Alembic copies the table instead
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("devices", JSON))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("gpus", server_default=None)  # new rows always say it
    rewrite_specs(with_one_device)


def downgrade() -> None:
    rewrite_specs(without_devices)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("devices")
        batch.drop_column("gpus")
    op.drop_table("workers")
