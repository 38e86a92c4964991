from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from jobs.errors import JobAlreadyFinished, JobNotFound, JobStateConflict, TooManyActiveJobs
from jobs.models import Job, JobMetrics, JobStatus, new_id, utcnow
from jobs.queries.events import add_event
from jobs.queries.webhooks import queue_webhook

_reached_step = and_(JobMetrics.job_id == Job.id, JobMetrics.step == Job.step)


def create_job(*, session: Session, owner: str, spec: dict[str, Any]) -> Job:
    """A queued job for a validated ``spec`` in its stored shape (``jobs.submission.stored_spec``:
    complete hyperparameters, dataset ids). Its columns are derived from ``spec`` here, and only
    here."""
    job = Job(
        id=new_id("job"),
        owner=owner,
        name=spec.get("name"),
        status=JobStatus.queued,
        spec=spec,
        base_model=spec["base_model"],
        dataset_id=spec["dataset_id"],
        eval_dataset_id=spec.get("eval_dataset_id"),
        webhook_url=spec.get("webhook_url"),
        max_steps=spec["hyperparameters"]["max_steps"],
        gpus=spec["gpus"],
        step=0,
        attempts=0,
        cancel_requested=False,
    )
    session.add(job)
    session.flush()
    add_event(session=session, job_id=job.id, kind="status", message="queued", data={"status": "queued"})
    return job


def get_job(*, session: Session, owner: str, job_id: str) -> Job:
    """``owner``'s job; another owner's is ``JobNotFound`` exactly like a missing one. The API
    reaches a job's metrics, events, samples and checkpoints through this (or the owner filter
    of ``list_metrics``) in the same transaction."""
    job = session.get(Job, job_id)
    if job is None or job.owner != owner:
        raise JobNotFound(job_id)
    return job


def get_job_with_metrics(*, session: Session, owner: str, job_id: str) -> tuple[Job, dict[str, Any] | None]:
    """A job and its metrics at the step it reached, in one query (the hottest read there is)."""
    row = session.execute(
        select(Job, JobMetrics.metrics)
        .outerjoin(JobMetrics, _reached_step)
        .where(Job.id == job_id, Job.owner == owner)
    ).first()
    if row is None:
        raise JobNotFound(job_id)
    return row[0], row[1]


def count_active_jobs(*, session: Session, owner: str) -> int:
    """``owner``'s queued and running jobs.

    On PostgreSQL this first takes a transaction-long lock on the owner, so that two requests
    creating jobs at once cannot both see room for one more. (SQLite runs one writer at a time.)
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"active-jobs:{owner}"))))
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner == owner, Job.status.in_([JobStatus.queued, JobStatus.running]))
        )
        or 0
    )


def list_jobs(
    *,
    session: Session,
    owner: str,
    status: JobStatus | None = None,
    after: str | None = None,
    limit: int = 20,
    metadata: dict[str, str] | None = None,
) -> tuple[list[tuple[Job, dict[str, Any] | None]], bool]:
    """Jobs with their latest metrics, newest first; ``after`` is the last id of the previous page.
    ``metadata``: only jobs whose OpenAI-style metadata (kept in the spec) has these values."""
    stmt = (
        select(Job, JobMetrics.metrics)
        .outerjoin(JobMetrics, _reached_step)
        .where(Job.owner == owner)
        .order_by(Job.id.desc())
    )
    if status is not None:
        stmt = stmt.where(Job.status == status)
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.spec["openai"]["metadata"][key].as_string() == value)
    if after:
        stmt = stmt.where(Job.id < after)
    rows = [(job, metrics) for job, metrics in session.execute(stmt.limit(limit + 1))]
    return rows[:limit], len(rows) > limit


def request_cancel(*, session: Session, owner: str, job_id: str) -> Job:
    """Cancel a queued or paused job now; ask a running one to stop at its next step boundary.

    Both are conditional updates, so a cancel racing a worker's claim lands on one side or the
    other: the job is cancelled before it starts, or the worker sees the request after a step.
    """
    was = get_job(session=session, owner=owner, job_id=job_id).status
    now = utcnow()
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.queued, JobStatus.paused]))
        .values(status=JobStatus.cancelled, finished_at=now, updated_at=now)
    ).rowcount
    if cancelled:
        message = "cancelled while paused" if was == JobStatus.paused else "cancelled before it started"
        add_event(
            session=session, job_id=job_id, kind="status", message=message, data={"status": "cancelled"}
        )
        queue_webhook(session=session, job_id=job_id)
    else:
        asked = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running, Job.cancel_requested.is_(False))
            .values(cancel_requested=True, updated_at=now)
        ).rowcount
        if asked:
            add_event(
                session=session,
                job_id=job_id,
                kind="status",
                message="cancel requested; the job stops after its current step",
            )
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise JobAlreadyFinished(job_id, job.status)
    return job


def request_pause(*, session: Session, owner: str, job_id: str) -> Job:
    """Pause a queued job now; ask a running one to stop at its next step boundary, after writing
    a checkpoint (its worker then marks it ``paused``). Pausing a paused job changes nothing.

    Conditional updates, as for cancel: a pause racing a worker's claim lands on one side or the
    other.
    """
    get_job(session=session, owner=owner, job_id=job_id)
    now = utcnow()
    paused = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.paused, updated_at=now)
    ).rowcount
    if paused:
        add_event(
            session=session,
            job_id=job_id,
            kind="status",
            message="paused before it started",
            data={"status": "paused"},
        )
    else:
        asked = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.running,
                Job.cancel_requested.is_(False),
                Job.pause_requested.is_(False),
            )
            .values(pause_requested=True, updated_at=now)
        ).rowcount
        if asked:
            add_event(
                session=session,
                job_id=job_id,
                kind="status",
                message="pause requested; the job stops after its current step, with a checkpoint",
            )
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    if JobStatus(job.status).terminal:
        raise JobStateConflict(
            job_id, f"already ended {job.status}; only a queued or running job can be paused"
        )
    if job.cancel_requested:
        raise JobStateConflict(job_id, "is being cancelled; it cannot be paused")
    return job


def request_resume(*, session: Session, owner: str, job_id: str, max_active_jobs: int) -> Job:
    """Queue a paused job again (the caller sends it after committing); its next run continues
    from its newest checkpoint. Like a new job, it counts against ``max_active_jobs``."""
    job = get_job(session=session, owner=owner, job_id=job_id)
    if job.status == JobStatus.running and job.pause_requested:
        raise JobStateConflict(
            job_id, "is still pausing (it stops after its current step); resume it once it shows paused"
        )
    if job.status != JobStatus.paused:
        raise JobStateConflict(job_id, f"is {job.status}; only a paused job can be resumed")
    active = count_active_jobs(session=session, owner=owner)
    if active >= max_active_jobs:
        raise TooManyActiveJobs(active, max_active_jobs)
    now = utcnow()
    # attempts count the runs since the owner last queued the job: the sweeper fails a job that
    # keeps losing its worker, and a run that paused cleanly is not a lost one.
    resumed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.paused)
        .values(status=JobStatus.queued, queued_at=now, sent_at=None, attempts=0, updated_at=now)
    ).rowcount
    if not resumed:  # a concurrent resume or cancel won
        raise JobStateConflict(job_id, "changed state meanwhile; look at it again")
    add_event(
        session=session,
        job_id=job_id,
        kind="status",
        message=f"resumed; continues after step {job.step}",
        data={"status": "queued"},
    )
    session.refresh(job)
    return job
