"""What a running job leaves behind: per-step metrics, events, samples, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.orm import Session

from jobs.errors import CheckpointNotFound, JobNotFound
from jobs.models import Checkpoint, Job, JobEvent, JobMetrics, JobSample, utcnow
from jobs.queries._util import page, upsert


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: JSON has no NaN or infinity (a diverged value becomes null) and
    anything unknown becomes its string."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy and torch scalars
        return jsonable(value.item())
    return str(value)


def _metric_values(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {k: v if v is None else float(v) for k, v in jsonable(metrics).items()
            if v is None or isinstance(v, int | float)}


def append_metrics(*, session: Session, job_id: str, step: int, metrics: dict[str, Any]) -> None:
    """Record a step's metrics; a step replayed after a resume overwrites its row."""
    values = {"job_id": job_id, "step": step, "metrics": _metric_values(metrics), "created_at": utcnow()}
    stmt = upsert(session, JobMetrics.__table__).values(**values)
    session.execute(stmt.on_conflict_do_update(
        index_elements=["job_id", "step"], set_={"metrics": stmt.excluded.metrics,
                                                 "created_at": stmt.excluded.created_at}))


def list_metrics(*, session: Session, job_id: str, after_step: int = 0,
                 limit: int = 1000) -> tuple[list[JobMetrics], bool]:
    """Metrics after ``after_step`` in step order; raises ``JobNotFound``. One query (clients
    poll this): the job's row, outer-joined to its newer metrics."""
    newer = and_(JobMetrics.job_id == Job.id, JobMetrics.step > after_step)
    rows = session.execute(select(Job.id, JobMetrics).outerjoin(JobMetrics, newer).where(Job.id == job_id)
                           .order_by(JobMetrics.step).limit(limit + 1)).all()
    if not rows:
        raise JobNotFound(job_id)
    metrics = [row for _, row in rows if row is not None]
    return metrics[:limit], len(metrics) > limit


def add_event(*, session: Session, job_id: str, kind: str, message: str, level: str = "info",
              data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, kind=kind, level=level, message=message, data=jsonable(data))
    session.add(event)
    session.flush()
    return event


def list_events(*, session: Session, job_id: str, after: int = 0, limit: int = 100) -> tuple[list[JobEvent], bool]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id)
    return page(session, stmt, limit=limit)


def add_samples(*, session: Session, job_id: str, step: int, samples: list[dict[str, Any]]) -> None:
    """Store a step's samples, replacing those of an earlier attempt at the same step."""
    session.execute(delete(JobSample).where(JobSample.job_id == job_id, JobSample.step == step))
    session.add_all(JobSample(job_id=job_id, step=step, data=jsonable(sample)) for sample in samples)
    session.flush()


def upsert_checkpoint(*, session: Session, job_id: str, step: int, path: str, kind: str, bytes: int) -> None:
    values = {"job_id": job_id, "step": step, "path": path, "kind": kind, "bytes": bytes, "created_at": utcnow()}
    stmt = upsert(session, Checkpoint.__table__).values(**values)
    session.execute(stmt.on_conflict_do_update(
        index_elements=["job_id", "step"], set_={k: stmt.excluded[k] for k in ("path", "kind", "bytes", "created_at")}))


def prune_checkpoints(*, session: Session, job_id: str, artifact_dir: Path) -> None:
    """Forget checkpoints the trainer has deleted from disk (it keeps the last few)."""
    for checkpoint in list_checkpoints(session=session, job_id=job_id):
        if not (artifact_dir / checkpoint.path).is_dir():
            session.delete(checkpoint)
    session.flush()


def list_checkpoints(*, session: Session, job_id: str) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def get_checkpoint(*, session: Session, job_id: str, step: int) -> Checkpoint:
    checkpoint = session.get(Checkpoint, (job_id, step))
    if checkpoint is None:
        raise CheckpointNotFound(job_id, step)
    return checkpoint
