"""Tenants: API keys, an owner on every dataset and job, Idempotency-Keys scoped per owner.

Rows made before this revision belong to the owner ``local`` (the one owner of a server whose
authentication is disabled). Idempotency-Keys move from a unique column of ``jobs`` to their own
table, keyed by (owner, endpoint, key), so that datasets have them too and two owners may pick
the same key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from jobs.models import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EXISTING_OWNER = "local"
JOBS_ENDPOINT = "POST /v1/jobs"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime()),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("owner", sa.String(255), primary_key=True),
        sa.Column("endpoint", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.execute(
        "INSERT INTO idempotency_keys (owner, endpoint, key, request_hash, resource_id, created_at) "
        f"SELECT '{EXISTING_OWNER}', '{JOBS_ENDPOINT}', idempotency_key, COALESCE(request_hash, ''), "
        "id, created_at "
        "FROM jobs WHERE idempotency_key IS NOT NULL"
    )

    for table in ("datasets", "jobs"):
        # batch mode: SQLite cannot ALTER most things, so Alembic copies the table instead
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("owner", sa.String(255), nullable=False, server_default=EXISTING_OWNER)
            )
        with op.batch_alter_table(table) as batch:
            batch.alter_column("owner", server_default=None)  # new rows always name their owner
            if table == "jobs":
                batch.drop_constraint(op.f("uq_jobs_idempotency_key"), type_="unique")
                batch.drop_column("idempotency_key")
                batch.drop_column("request_hash")
        op.create_index(op.f(f"ix_{table}_owner_id"), table, ["owner", "id"])
    op.create_index(op.f("ix_jobs_owner_status"), "jobs", ["owner", "status"])


def downgrade() -> None:
    # Owners and keys are dropped; the Idempotency-Keys of the last 24 hours are not carried back
    # (two owners may have used the same key, which the old unique column cannot hold).
    op.drop_index(op.f("ix_jobs_owner_status"), table_name="jobs")
    for table in ("jobs", "datasets"):
        op.drop_index(op.f(f"ix_{table}_owner_id"), table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("owner")
            if table == "jobs":
                batch.add_column(sa.Column("idempotency_key", sa.String(255)))
                batch.add_column(sa.Column("request_hash", sa.String(64)))
                batch.create_unique_constraint(op.f("uq_jobs_idempotency_key"), ["idempotency_key"])
    op.drop_table("idempotency_keys")
    op.drop_table("api_keys")
