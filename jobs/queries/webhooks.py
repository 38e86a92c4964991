"""A job's webhook delivery, in the job's row: queued with its terminal status, then attempted
by whoever claims it (the process that ended the job at once, any sweeper when it is due).

A claim is a conditional update that counts the attempt and pushes ``webhook_due_at`` past the
attempt's deadline, so that two deliverers never make the same attempt, and an attempt whose
process died is made again once that deadline passes. Its outcome is recorded only while the
attempt count is still the claimed one (a later claim took over otherwise).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs.models import Job, JobMetrics, WebhookStatus, utcnow
from jobs.queries.events import add_event


def queue_webhook(*, session: Session, job_id: str) -> None:
    """Make the webhook of a job that just ended due now (if it has a webhook_url). Call it in
    the transaction that ends the job, after the conditional update that ended it succeeded."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.webhook_url.is_not(None), Job.webhook_status.is_(None))
        .values(webhook_status=WebhookStatus.pending, webhook_due_at=utcnow())
    )


def list_due_webhooks(*, session: Session, limit: int = 100) -> list[str]:
    """Jobs whose webhook has an attempt due, oldest first."""
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.webhook_status == WebhookStatus.pending,
                Job.webhook_due_at <= utcnow(),
            )
            .order_by(Job.webhook_due_at)
            .limit(limit)
        )
    )


def claim_webhook_attempt(
    *, session: Session, job_id: str, deadline_s: float
) -> tuple[Job, dict[str, Any] | None] | None:
    """Take the job's due webhook attempt: the job (its ``webhook_attempts`` is this attempt's
    number) and its latest metrics, or None when no attempt is due or another deliverer holds it.
    Until ``deadline_s`` from now no one else makes an attempt."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.webhook_status == WebhookStatus.pending, Job.webhook_due_at <= now)
        .values(webhook_attempts=Job.webhook_attempts + 1, webhook_due_at=now + timedelta(seconds=deadline_s))
    ).rowcount
    if not claimed:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    metrics = session.scalar(
        select(JobMetrics.metrics).where(JobMetrics.job_id == job_id, JobMetrics.step == job.step)
    )
    return job, metrics


def record_webhook_attempt(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    status: WebhookStatus,
    message: str,
    retry_at: datetime | None = None,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> bool:
    """Record how attempt ``attempt`` went: ``delivered``, ``failed`` (given up), or ``pending``
    again with the next attempt at ``retry_at``; and an event saying so. False (and nothing
    recorded) if a later attempt was claimed meanwhile."""
    assert (status == WebhookStatus.pending) == (retry_at is not None)
    recorded = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.webhook_status == WebhookStatus.pending, Job.webhook_attempts == attempt)
        .values(webhook_status=status, webhook_due_at=retry_at)
    ).rowcount
    if recorded:
        add_event(
            session=session,
            job_id=job_id,
            kind="webhook",
            level=level,
            message=message,
            data={"attempt": attempt, "webhook_status": status.value, **(data or {})},
        )
    return bool(recorded)
