"""One stored spec: a job's ``group_size`` lives inside its ``hyperparameters`` only. Until now the
spec was the request as posted with a top-level ``group_size`` (the one the job runs with) beside
the ``hyperparameters`` (which might hold another, overridden by it); ``jobs.submission`` now
stores the trainer's config, with ``group_size`` inside it. Jobs made before keep their other
hyperparameters as posted: those they left out still take the trainer's defaults when read.

Plain JSON over the rows, in batches, the same on PostgreSQL and SQLite; nothing imported from the
application, so that the revision does what it did when it was written.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 500
jobs = sa.table(
    "jobs",
    sa.column("id", sa.String()),
    sa.column("spec", sa.JSON().with_variant(JSONB(), "postgresql")),
)


def group_size_inside(spec: dict[str, Any]) -> dict[str, Any]:
    """The top-level ``group_size`` moved into ``hyperparameters``, where it wins over one already
    there (as it did when read); a null one is dropped."""
    spec = dict(spec)
    top_level = spec.pop("group_size", None)
    if top_level is not None:
        spec["hyperparameters"] = {**(spec.get("hyperparameters") or {}), "group_size": top_level}
    return spec


def group_size_beside(spec: dict[str, Any]) -> dict[str, Any]:
    """``group_size`` at the top level again (the code before this revision reads it there), left
    inside ``hyperparameters`` too: that code lets the top level win."""
    group_size = (spec.get("hyperparameters") or {}).get("group_size")
    return spec if group_size is None else {**spec, "group_size": group_size}


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
    rewrite_specs(group_size_inside)


def downgrade() -> None:
    rewrite_specs(group_size_beside)
