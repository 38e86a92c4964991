"""Jobs can be paused: a ``paused`` status, and ``pause_requested`` for a running job asked to
stop at its next step boundary (beside ``cancel_requested``, which it mirrors).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')"
NEW = "status IN ('queued', 'running', 'paused', 'succeeded', 'failed', 'cancelled')"


def _replace_status_check(condition: str) -> None:
    # batch mode: SQLite cannot alter a constraint in place, it copies the table
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch.create_check_constraint("status", condition)


def upgrade() -> None:
    _replace_status_check(NEW)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("pause_requested", server_default=None)  # new rows always say it


def downgrade() -> None:
    op.execute("UPDATE jobs SET status = 'queued' WHERE status = 'paused'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pause_requested")
    _replace_status_check(OLD)
