"""PostgreSQL tells listeners when a job's answers change: each write to a job's row or to its
metrics sends ``NOTIFY grpo_job_changed, '<job id>'``, delivered when the writing transaction
commits (and not at all if it rolls back). API processes listen on the channel and drop their
cached answers for that job (``api/cache.py``). Triggers, not application code, so that every
writer (the API, workers, sweepers, an operator's psql) is heard. SQLite has no NOTIFY: the
embedded default caches nothing, and this revision does nothing there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "grpo_job_changed"  # api/cache.py listens on it


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # TG_ARGV[0]: the column holding the job's id ("id" on jobs, "job_id" on job_metrics).
    # Several notifications with one payload in one transaction are delivered once.
    op.execute(f"""
        CREATE FUNCTION grpo_notify_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            changed jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
        BEGIN
            PERFORM pg_notify('{CHANNEL}', changed ->> TG_ARGV[0]);
            RETURN NULL;
        END
        $$
    """)
    op.execute("""
        CREATE TRIGGER jobs_notify_changed AFTER UPDATE OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION grpo_notify_job_changed('id')
    """)
    op.execute("""
        CREATE TRIGGER job_metrics_notify_changed AFTER INSERT OR UPDATE OR DELETE ON job_metrics
        FOR EACH ROW EXECUTE FUNCTION grpo_notify_job_changed('job_id')
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER job_metrics_notify_changed ON job_metrics")
    op.execute("DROP TRIGGER jobs_notify_changed ON jobs")
    op.execute("DROP FUNCTION grpo_notify_job_changed()")
