from __future__ import annotations

from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from jobs.errors import JobAlreadyFinished, JobNotFound
from jobs.models import Job, JobMetrics, JobStatus, new_id, utcnow
from jobs.queries.records import add_event

_reached_step = and_(JobMetrics.job_id == Job.id, JobMetrics.step == Job.step)


def create_job(*, session: Session, spec: dict[str, Any], max_steps: int, idempotency_key: str | None = None,
               request_hash: str | None = None) -> Job:
    """A queued job for a validated ``spec`` (the HTTP job spec with ids, as stored)."""
    job = Job(id=new_id("job"), name=spec.get("name"), status=JobStatus.queued, spec=spec,
              base_model=spec["base_model"], dataset_id=spec["dataset_id"],
              eval_dataset_id=spec.get("eval_dataset_id"), webhook_url=spec.get("webhook_url"),
              max_steps=max_steps, step=0, attempts=0, cancel_requested=False,
              idempotency_key=idempotency_key, request_hash=request_hash)
    session.add(job)
    session.flush()
    add_event(session=session, job_id=job.id, kind="status", message="queued", data={"status": "queued"})
    return job


def get_job(*, session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def get_job_with_metrics(*, session: Session, job_id: str) -> tuple[Job, dict[str, Any] | None]:
    """A job and its metrics at the step it reached, in one query (the hottest read there is)."""
    row = session.execute(select(Job, JobMetrics.metrics).outerjoin(JobMetrics, _reached_step)
                          .where(Job.id == job_id)).first()
    if row is None:
        raise JobNotFound(job_id)
    return row[0], row[1]


def get_job_by_idempotency_key(*, session: Session, idempotency_key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))


def list_jobs(*, session: Session, status: JobStatus | None = None, after: str | None = None,
              limit: int = 20) -> tuple[list[tuple[Job, dict[str, Any] | None]], bool]:
    """Jobs with their latest metrics, newest first; ``after`` is the last id of the previous page."""
    stmt = select(Job, JobMetrics.metrics).outerjoin(JobMetrics, _reached_step).order_by(Job.id.desc())
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if after:
        stmt = stmt.where(Job.id < after)
    rows = [(job, metrics) for job, metrics in session.execute(stmt.limit(limit + 1))]
    return rows[:limit], len(rows) > limit


def request_cancel(*, session: Session, job_id: str) -> Job:
    """Cancel a queued job now; ask a running one to stop at its next step boundary.

    Both are conditional updates, so a cancel racing a worker's claim lands on one side or the
    other: the job is cancelled before it starts, or the worker sees the request after a step.
    """
    now = utcnow()
    cancelled = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, finished_at=now, updated_at=now)
    ).rowcount
    if cancelled:
        add_event(session=session, job_id=job_id, kind="status", message="cancelled before it started",
                  data={"status": "cancelled"})
    else:
        asked = session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.running, Job.cancel_requested.is_(False))
            .values(cancel_requested=True, updated_at=now)
        ).rowcount
        if asked:
            add_event(session=session, job_id=job_id, kind="status",
                      message="cancel requested; the job stops after its current step")
    job = get_job(session=session, job_id=job_id)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise JobAlreadyFinished(job_id, job.status)
    return job
