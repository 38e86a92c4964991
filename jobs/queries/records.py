"""What a running job leaves behind: per-step metrics, events, samples, checkpoints.

They are keyed by job id: the API reads them only after ``get_job(owner=...)`` found the job in
the same transaction (``list_metrics``, polled hardest, filters by owner itself)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.orm import Session

from jobs.errors import CheckpointNotFound, JobNotFound
from jobs.models import Checkpoint, Job, JobEvent, JobMetrics, JobSample, utcnow
from jobs.queries._util import page, upsert
from jobs.text import storable_text


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON the database can store: JSON has no NaN or infinity (a diverged
    value becomes null), a string loses the characters no column can hold (a model's or a
    grader's output may have a NUL), and anything unknown becomes its string."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {storable_text(str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy and torch scalars
        return jsonable(value.item())
    return storable_text(str(value))


def _metric_values(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        k: v if v is None else float(v)
        for k, v in jsonable(metrics).items()
        if v is None or isinstance(v, int | float)
    }


def append_metrics(*, session: Session, job_id: str, step: int, metrics: dict[str, Any]) -> None:
    """Record a step's metrics; a step replayed after a resume overwrites its row."""
    values = {"job_id": job_id, "step": step, "metrics": _metric_values(metrics), "created_at": utcnow()}
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


def add_event(
    *,
    session: Session,
    job_id: str,
    kind: str,
    message: str,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(
        job_id=job_id, kind=kind, level=level, message=storable_text(message), data=jsonable(data)
    )
    session.add(event)
    session.flush()
    return event


def list_events(
    *, session: Session, job_id: str, after: int = 0, limit: int = 100
) -> tuple[list[JobEvent], bool]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id)
    return page(session, stmt, limit=limit)


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


def upsert_checkpoint(*, session: Session, job_id: str, step: int, path: str, kind: str, bytes: int) -> None:
    """Record a complete checkpoint; one replayed after a resume replaces the row (and its
    evaluation, which ``record_evaluation`` writes again)."""
    values = {
        "job_id": job_id,
        "step": step,
        "path": path,
        "kind": kind,
        "bytes": bytes,
        "created_at": utcnow(),
        "eval_metrics": None,
    }
    stmt = upsert(session, Checkpoint.__table__).values(**values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "step"],
            set_={k: stmt.excluded[k] for k in ("path", "kind", "bytes", "created_at", "eval_metrics")},
        )
    )


def record_evaluation(
    *, session: Session, job_id: str, step: int, figures: dict[str, Any], best_step: int | None
) -> None:
    """Store checkpoint ``step``'s figures on the eval set and, when the job chooses one
    (``keep_best_by``), which checkpoint is now its best."""
    session.execute(
        update(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.step == step)
        .values(eval_metrics=_metric_values(figures))
    )
    if best_step is not None:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.best_checkpoint_step.is_distinct_from(best_step))
            .values(best_checkpoint_step=best_step)
        )


def delete_checkpoint(*, session: Session, job_id: str, step: int) -> None:
    """Forget checkpoint ``step``, which the trainer deleted from disk (pruned, or diverged);
    one never recorded (the trainer's report repeated after a crash) is no error."""
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step))


def forget_missing_checkpoints(*, session: Session, job_id: str, artifact_dir: Path) -> list[int]:
    """Forget the checkpoints whose directory is gone, and return their steps: only for a run that
    ended without telling (``delete_checkpoint`` keeps the record in step otherwise)."""
    missing = [
        checkpoint
        for checkpoint in list_checkpoints(session=session, job_id=job_id)
        if not (artifact_dir / checkpoint.path).is_dir()
    ]
    for checkpoint in missing:
        session.delete(checkpoint)
    session.flush()
    return [checkpoint.step for checkpoint in missing]


def list_checkpoints(*, session: Session, job_id: str) -> list[Checkpoint]:
    return list(
        session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
    )


def get_checkpoint(*, session: Session, job_id: str, step: int) -> Checkpoint:
    checkpoint = session.get(Checkpoint, (job_id, step))
    if checkpoint is None:
        raise CheckpointNotFound(job_id, step)
    return checkpoint
