"""The job's record of its checkpoints: one row per complete checkpoint on disk, with its
evaluation figures, and the job's best one. The trainer owns the set on disk; these follow it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from jobs.errors import CheckpointNotFound
from jobs.models import Checkpoint, Job, utcnow
from jobs.queries._util import metric_values, upsert


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
        .values(eval_metrics=metric_values(figures))
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
