"""The trainer's progress hooks, written to the job record."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobs.artifacts import describe_checkpoint, relative_to_artifacts
from jobs.db import unit_of_work
from jobs.queries import (
    add_event,
    add_samples,
    append_metrics,
    is_cancel_requested,
    prune_checkpoints,
    record_step,
    upsert_checkpoint,
)
from trainer.progress import Progress

LEVELS = {"debug": "info", "info": "info", "warning": "warning", "warn": "warning", "error": "error"}


class LeaseLost(Exception):
    """This worker no longer holds the job: the sweeper gave it to another. Stop without writing."""


class JobProgress(Progress):
    def __init__(self, *, job_id: str, worker: str, sessions: sessionmaker[Session], artifact_dir: Path):
        self.job_id, self.worker, self.sessions, self.artifact_dir = job_id, worker, sessions, artifact_dir
        self.lease_lost = threading.Event()  # set by the heartbeat thread

    def _hold(self) -> None:
        if self.lease_lost.is_set():
            raise LeaseLost(self.job_id)

    def on_start(self, *, start_step: int, max_steps: int) -> None:
        message = (f"training from step {start_step + 1} of {max_steps}" if start_step == 0 else
                   f"resuming after step {start_step} of {max_steps}")
        with unit_of_work(self.sessions) as session:
            add_event(session=session, job_id=self.job_id, kind="log", message=message,
                      data={"start_step": start_step, "max_steps": max_steps})

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._hold()
        with unit_of_work(self.sessions) as session:
            if not record_step(session=session, job_id=self.job_id, worker=self.worker, step=step):
                raise LeaseLost(self.job_id)
            append_metrics(session=session, job_id=self.job_id, step=step, metrics=metrics)

    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        with unit_of_work(self.sessions) as session:
            add_samples(session=session, job_id=self.job_id, step=step, samples=samples)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._hold()
        kind, size = describe_checkpoint(Path(path))
        with unit_of_work(self.sessions) as session:
            upsert_checkpoint(session=session, job_id=self.job_id, step=step, kind=kind, bytes=size,
                              path=relative_to_artifacts(Path(path), self.artifact_dir))
            prune_checkpoints(session=session, job_id=self.job_id, artifact_dir=self.artifact_dir)
            add_event(session=session, job_id=self.job_id, kind="checkpoint", message=f"checkpoint at step {step}",
                      data={"step": step, "kind": kind, "bytes": size})

    def on_log(self, level: str, message: str) -> None:
        with unit_of_work(self.sessions) as session:
            add_event(session=session, job_id=self.job_id, kind="log", level=LEVELS.get(level.lower(), "info"),
                      message=message)

    def should_stop(self) -> bool:
        self._hold()
        with unit_of_work(self.sessions) as session:
            return is_cancel_requested(session=session, job_id=self.job_id)
