"""The trainer's progress hooks, written to the job record (and, with an object store, each
checkpoint sent to the store before its row is written)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from jobs.artifacts import describe_checkpoint, relative_to_artifacts
from jobs.queries import (
    add_event,
    add_samples,
    append_metrics,
    delete_checkpoint,
    is_stop_requested,
    record_evaluation,
    record_step,
    upsert_checkpoint,
)
from jobs.settings import Settings
from jobs.store import ArtifactStore
from trainer.layout import checkpoint_name
from trainer.progress import Progress
from trainer.tracking import WandbOptions
from worker.retry import with_retries

LEVELS = {"debug": "info", "info": "info", "warning": "warning", "warn": "warning", "error": "error"}
T = TypeVar("T")


def wandb_options(settings: Settings, *, job_id: str, job_name: str | None) -> WandbOptions | None:
    """Where the job's metrics go in W&B, when the operator set ``GRPO_WANDB_PROJECT``; one W&B run
    per job (its id), so a resumed attempt continues the same run."""
    if not settings.wandb_project:
        return None
    return WandbOptions(
        project=settings.wandb_project,
        entity=settings.wandb_entity,
        mode=settings.wandb_mode,
        run_id=job_id,
        name=job_name or job_id,
        tags=("grpo",),
    )


class LeaseLost(Exception):
    """This worker no longer holds the job: the sweeper gave it to another. Stop without writing."""


class JobProgress(Progress):
    """Every hook is one unit of work, retried while the database is unreachable (for up to
    ``database_retry_s``): a short outage pauses training instead of ending it."""

    def __init__(
        self,
        *,
        job_id: str,
        worker: str,
        sessions: sessionmaker[Session],
        artifact_dir: Path,
        database_retry_s: float,
        store: ArtifactStore | None = None,
        job_dir: Path | None = None,
    ):
        """``store`` (with the ``job_dir`` the trainer writes to): the object store, where each
        checkpoint goes before it is recorded."""
        self.job_id, self.worker, self.sessions, self.artifact_dir = job_id, worker, sessions, artifact_dir
        self.database_retry_s = database_retry_s
        self.store, self.job_dir = store, job_dir
        self.lease_lost = threading.Event()  # set by the heartbeat thread

    def _hold(self) -> None:
        if self.lease_lost.is_set():
            raise LeaseLost(self.job_id)

    def _write(self, work: Callable[[Session], T], what: str) -> T:
        return with_retries(
            self.sessions, work, within_s=self.database_retry_s, what=f"job {self.job_id}: {what}"
        )

    def on_start(self, *, start_step: int, max_steps: int) -> None:
        message = (
            f"training from step {start_step + 1} of {max_steps}"
            if start_step == 0
            else f"resuming after step {start_step} of {max_steps}"
        )
        self._write(
            lambda session: add_event(
                session=session,
                job_id=self.job_id,
                kind="log",
                message=message,
                data={"start_step": start_step, "max_steps": max_steps},
            ),
            "start",
        )

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._hold()

        def write(session: Session) -> None:
            if not record_step(session=session, job_id=self.job_id, worker=self.worker, step=step):
                raise LeaseLost(self.job_id)
            append_metrics(session=session, job_id=self.job_id, step=step, metrics=metrics)

        self._write(write, f"metrics of step {step}")

    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self._write(
            lambda session: add_samples(session=session, job_id=self.job_id, step=step, samples=samples),
            f"samples of step {step}",
        )

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Record a checkpoint the trainer wrote; with a store, only once it is complete there
        (every file, then its manifest): a recorded checkpoint is one any worker can resume from
        and the API can serve."""
        self._hold()
        kind, size = describe_checkpoint(Path(path))
        if self.store is not None:
            self.store.upload_dir(Path(path), self.store.key_of(Path(path)))
            self._hold()  # the upload may have taken a while

        def write(session: Session) -> None:
            upsert_checkpoint(
                session=session,
                job_id=self.job_id,
                step=step,
                kind=kind,
                bytes=size,
                path=relative_to_artifacts(Path(path), self.artifact_dir),
            )
            add_event(
                session=session,
                job_id=self.job_id,
                kind="checkpoint",
                message=f"checkpoint at step {step}",
                data={"step": step, "kind": kind, "bytes": size},
            )

        self._write(write, f"checkpoint of step {step}")

    def on_checkpoint_removed(self, step: int) -> None:
        """Forget a checkpoint the trainer deleted; with a store, delete it there first (as the
        trainer deleted the files first): a worker that dies in between leaves a row whose files
        are gone, which the next attempt forgets."""
        self._hold()
        if self.store is not None:
            assert self.job_dir is not None
            self.store.delete_dir(self.store.key_of(self.job_dir / "checkpoints" / checkpoint_name(step)))
        self._write(
            lambda session: delete_checkpoint(session=session, job_id=self.job_id, step=step),
            f"removal of checkpoint {step}",
        )

    def on_evaluation(self, step: int, figures: dict[str, float], *, best_step: int | None) -> None:
        self._hold()
        shown = ", ".join(
            f"{name} {value:.4g}"
            for name, value in figures.items()
            if name == "reward" or name.startswith("pass@")
        )
        best = "" if best_step is None else f"; best checkpoint: step {best_step}"

        def write(session: Session) -> None:
            record_evaluation(
                session=session, job_id=self.job_id, step=step, figures=figures, best_step=best_step
            )
            add_event(
                session=session,
                job_id=self.job_id,
                kind="evaluation",
                message=f"checkpoint at step {step} on the eval set: {shown}{best}",
                data={"step": step, "eval": figures, "best_step": best_step},
            )

        self._write(write, f"evaluation of step {step}")

    def on_log(self, level: str, message: str) -> None:
        self._write(
            lambda session: add_event(
                session=session,
                job_id=self.job_id,
                kind="log",
                level=LEVELS.get(level.lower(), "info"),
                message=message,
            ),
            "log",
        )

    def should_stop(self) -> bool:
        """True once the job was asked to cancel or to pause: the trainer then writes a checkpoint
        and returns, and the runner records which of the two it was."""
        self._hold()
        return self._write(
            lambda session: is_stop_requested(session=session, job_id=self.job_id), "stop check"
        )
