"""Running one job: claim it, train with progress hooks under a heartbeat, record how it ended."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.orm import Session

from jobs.db import session_factory
from jobs.models import JobStatus
from jobs.queries import claim_job, finish_job, forget_missing_checkpoints, stop_job
from jobs.settings import Settings
from jobs.store import StoreUnavailable, open_store
from jobs.submission import run_config_for
from jobs.webhooks import first_attempt
from trainer.config import ConfigError
from trainer.errors import TrainingError
from trainer.loop import train
from worker.artifacts import prepare_run, publish_run_logs
from worker.devices import worker_devices
from worker.heartbeat import Heartbeat
from worker.merge import merge_final_adapter
from worker.progress import JobProgress, LeaseLost, wandb_options
from worker.retry import DATABASE_UNREACHABLE, with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")


def internal_failure_reason(job_id: str, exc: Exception) -> str:
    """A failure reason for an error the worker did not expect: the kind of error, never its text."""
    return (
        f"internal error in the worker ({type(exc).__name__}); this is a fault of the service, not known to "
        f"come from your spec: create the job again, and if it fails the same way, give the operator its id "
        f"({job_id}), whose traceback the worker log has"
    )


def claim_and_run(job_id: str, *, settings: Settings, worker: str) -> None:
    """Claim job ``job_id`` and train it to its end, recording progress, checkpoints and the
    outcome; a job that is not queued (a duplicate message) is left alone."""
    sessions = session_factory(settings.database_url)
    retry_s = settings.database_retry_s
    devices = worker_devices(settings.worker_devices)
    job = with_retries(
        sessions,
        lambda session: claim_job(session=session, job_id=job_id, worker=worker, devices=devices),
        within_s=retry_s,
        what=f"job {job_id}: claim",
    )
    if job is None:
        # A duplicate message (a re-send, a redelivery): the job is held, finished, paused or cancelled.
        # (Or it asks for more devices than this worker has: a message on a queue of a size this worker
        # does not run, consumed by hand; it stays queued for a worker that fits.)
        log.info("job %s is not queued, or asks for more than this worker's %d devices", job_id, len(devices))
        return
    log.info("job %s: claimed by %s on %s (attempt %d)", job_id, worker, ", ".join(job.devices), job.attempts)
    assert settings.artifact_dir is not None
    artifact_dir, job_dir, store = settings.artifact_dir, settings.job_dir(job_id), open_store(settings)

    def write(work: Callable[[Session], T]) -> T:
        return with_retries(sessions, work, within_s=retry_s, what=f"job {job_id}: checkpoints")

    # The trainer reports each checkpoint it deletes (JobProgress.on_checkpoint_removed), but a worker
    # that died between deleting one and committing the report (killed, or the database out of reach
    # past database_retry_s) left a row whose files are gone, and no later run reports that step again.
    # So the record is checked against the disk (or the store) once, before a resumed run; after a
    # clean end (a pause) or on a first attempt it finds nothing. With a store, this machine's cache
    # then gets the job's datasets and newest checkpoint (worker.artifacts), under the heartbeat:
    # a large checkpoint may take longer to fetch than a lease lasts.
    def prepare() -> None:
        if store is None:
            forgotten = write(
                lambda session: forget_missing_checkpoints(
                    session=session, job_id=job_id, artifact_dir=artifact_dir
                )
            )
        else:
            forgotten = prepare_run(job_id=job_id, spec=job.spec, settings=settings, store=store, write=write)
        if forgotten:
            log.warning(
                "job %s: forgot the checkpoints of steps %s, deleted by an earlier attempt that died "
                "before recording it",
                job_id,
                forgotten,
            )

    progress = JobProgress(
        job_id=job_id,
        worker=worker,
        sessions=sessions,
        artifact_dir=artifact_dir,
        database_retry_s=retry_s,
        store=store,
        job_dir=job_dir,
    )
    stopped_at, reason = None, None
    try:
        with Heartbeat(
            sessions=sessions,
            job_id=job_id,
            worker=worker,
            interval=settings.heartbeat_interval_s,
            on_lost=progress.lease_lost.set,
        ):
            prepare()
            run = run_config_for(job, settings)
            try:
                result = train(
                    run,
                    job_dir,
                    progress=progress,
                    resume=True,
                    wandb=wandb_options(settings, job_id=job_id, job_name=run.name),
                )
            finally:
                if store is not None:
                    publish_run_logs(job_dir, store)
            if not result.stopped and run.hyperparameters.lora is not None and result.checkpoint is not None:
                merge_final_adapter(result.checkpoint, job_dir, result.final_step, progress, store)
        stopped_at = result.final_step if result.stopped else None
    except LeaseLost:
        log.warning("job %s: another worker holds it now; leaving it alone", job_id)
        return
    except StoreUnavailable:
        log.exception(
            "job %s: the artifact store became unreachable; giving the job up (the sweeper re-queues "
            "it once its heartbeat is stale, and the next attempt resumes from its newest stored checkpoint)",
            job_id,
        )
        return
    except DATABASE_UNREACHABLE:
        log.exception(
            "job %s: the database stayed unreachable for %ss; giving the job up (the sweeper "
            "re-queues it once the database is back and its heartbeat is stale)",
            job_id,
            retry_s,
        )
        return
    except ConfigError as exc:  # the spec passed these checks when created; a newer trainer may disagree
        reason = f"{exc.param}: {exc.message}"
    except TrainingError as exc:
        reason = str(exc)
    except Exception as exc:
        # Its text may quote SQL, paths or a traceback of this machine: the log keeps it, the user
        # gets what to do. (Errors meant for the user are TrainingError or ConfigError, above.)
        log.exception("job %s crashed", job_id)
        reason = internal_failure_reason(job_id, exc)

    def record_end(session: Session) -> JobStatus | None:
        if stopped_at is not None:  # asked to stop: cancelled, or paused to be resumed
            return stop_job(session=session, job_id=job_id, worker=worker, step=stopped_at)
        status = JobStatus.succeeded if reason is None else JobStatus.failed
        return (
            status
            if finish_job(session=session, job_id=job_id, worker=worker, status=status, reason=reason)
            else None
        )

    status = with_retries(sessions, record_end, within_s=retry_s, what=f"job {job_id}: record its end")
    if status is None:
        log.warning("job %s: lease lost before its end could be recorded", job_id)
        return
    log.info("job %s: %s%s", job_id, status.value, f" ({reason})" if reason else "")
    if status.terminal:  # the webhook's first attempt; retries are the sweepers'
        first_attempt(job_id, sessions=sessions, settings=settings)
