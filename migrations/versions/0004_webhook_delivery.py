"""Webhook delivery state on the job: a job with a webhook_url that ends gets ``webhook_status``
``pending`` in the same transaction, and keeps its attempts and the time the next one is due,
so that a crash or a restart loses no delivery. Jobs that ended before this revision have none.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from jobs.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER most things, so Alembic copies the table instead
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_status", sa.String(16)))
        batch.add_column(sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("webhook_due_at", UTCDateTime()))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("webhook_attempts", server_default=None)  # new rows always say it
    op.create_index(
        op.f("ix_jobs_webhook_status_webhook_due_at"), "jobs", ["webhook_status", "webhook_due_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_webhook_status_webhook_due_at"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_due_at")
        batch.drop_column("webhook_attempts")
        batch.drop_column("webhook_status")
