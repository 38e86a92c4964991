"""What each step of a running job leaves behind: its metrics and its samples.

They are keyed by job id: the API reads them only after ``get_job(owner=...)`` found the job in
the same transaction (``list_metrics``, polled hardest, filters by owner itself)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.orm import Session

from jobs.errors import JobNotFound
from jobs.models import Job, JobMetrics, JobSample, utcnow
from jobs.queries._util import jsonable, metric_values, page, upsert


def append_metrics(*, session: Session, job_id: str, step: int, metrics: dict[str, Any]) -> None:
    """Record a step's metrics; a step replayed after a resume overwrites its row."""
    values = {"job_id": job_id, "step": step, "metrics": metric_values(metrics), "created_at": utcnow()}
    stmt = upsert(session, JobMetrics.__table__).values(**values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "step"],
            set_={"metrics": stmt.excluded.metrics, "created_at": stmt.excluded.created_at},
        )
    )


def list_metrics(
    *, session: Session, owner: str, job_id: str, after_step: int = 0, limit: int = 1000
) -> tuple[list[tuple[int, dict[str, float | None], datetime]], bool]:
    """``(step, metrics, created_at)`` rows after ``after_step`` in step order; raises
    ``JobNotFound`` (also for another owner's job). One query, of plain columns rather than ORM
    objects (clients poll this, hundreds of rows at a time): the job's row, outer-joined to its
    newer metrics."""
    newer = and_(JobMetrics.job_id == Job.id, JobMetrics.step > after_step)
    rows = session.execute(
        select(Job.id, JobMetrics.step, JobMetrics.metrics, JobMetrics.created_at)
        .outerjoin(JobMetrics, newer)
        .where(Job.id == job_id, Job.owner == owner)
        .order_by(JobMetrics.step)
        .limit(limit + 1)
    ).all()
    if not rows:
        raise JobNotFound(job_id)
    metrics = [tuple(row[1:]) for row in rows if row.step is not None]
    return metrics[:limit], len(metrics) > limit


MAX_SAMPLES_PER_STEP = 16  # the trainer hands num_samples_logged (default 4), which a spec may raise
MAX_SAMPLE_CHARS = 16_000  # per prompt or completion: enough to read, bounded to store


def _clipped(sample: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value[:MAX_SAMPLE_CHARS] + " [...]"
        if isinstance(value, str) and len(value) > MAX_SAMPLE_CHARS
        else value
        for key, value in jsonable(sample).items()
    }


def add_samples(*, session: Session, job_id: str, step: int, samples: list[dict[str, Any]]) -> None:
    """Store a step's samples (at most ``MAX_SAMPLES_PER_STEP``, long texts clipped), replacing
    those of an earlier attempt at the same step."""
    session.execute(delete(JobSample).where(JobSample.job_id == job_id, JobSample.step == step))
    session.add_all(
        JobSample(job_id=job_id, step=step, data=_clipped(sample))
        for sample in samples[:MAX_SAMPLES_PER_STEP]
    )
    session.flush()


def list_samples(
    *, session: Session, job_id: str, step: int | None = None, after: int = 0, limit: int = 20
) -> tuple[list[JobSample], bool]:
    """A job's samples in the order they were stored (step order), optionally of one step."""
    stmt = select(JobSample).where(JobSample.job_id == job_id, JobSample.id > after).order_by(JobSample.id)
    if step is not None:
        stmt = stmt.where(JobSample.step == step)
    return page(session, stmt, limit=limit)
