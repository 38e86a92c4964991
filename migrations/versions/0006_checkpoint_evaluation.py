"""Evaluation that chooses: each checkpoint keeps its figures on the eval set (``eval_metrics``:
``{"reward": …, "pass@4": …}``, null where the job has no eval set), and a job with
``keep_best_by`` says which of its checkpoints is best (``best_checkpoint_step``, null until the
first evaluation, and for jobs that do not choose).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER most things, so Alembic copies the table instead
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("eval_metrics", sa.JSON().with_variant(JSONB(), "postgresql")))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("best_checkpoint_step", sa.Integer()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("best_checkpoint_step")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("eval_metrics")
