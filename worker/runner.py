"""Running one job: claim it, train with progress hooks under a heartbeat, record how it ended."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from sqlalchemy.orm import Session

from jobs.db import session_factory
from jobs.models import JobStatus
from jobs.queries import claim_job, finish_job, forget_missing_checkpoints, record_given_up, stop_job
from jobs.settings import Settings
from jobs.store import StoreUnavailable, open_store
from jobs.submission import run_config_for
from jobs.webhooks import first_attempt
from trainer.config import ConfigError
from trainer.distributed import LaunchFailed, launch
from trainer.errors import TrainingError
from trainer.loop import TrainResult, train
from worker.artifacts import job_files_in_use, prepare_run, publish_run_logs
from worker.devices import worker_devices
from worker.heartbeat import Heartbeat
from worker.merge import merge_final_adapter
from worker.progress import JobProgress, LeaseLost, wandb_options
from worker.rank import outcome_path
from worker.retry import DATABASE_UNREACHABLE, with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")


def usable_device(name: str) -> torch.device:
    """The device a job's record names, or a ``TrainingError`` the operator can act on where this
    worker cannot use it (it counted a GPU its CUDA runtime cannot start: a driver older than the
    CUDA of the installed torch, say)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            f"this worker declared {name} but cannot use CUDA (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda or 'none'}): the operator should check the GPU driver and the "
            "installed torch, or declare the worker's devices with GRPO_WORKER_DEVICES"
        )
    return device


def internal_failure_reason(job_id: str, exc: Exception) -> str:
    """A failure reason for an error the worker did not expect: the kind of error, never its text."""
    return (
        f"internal error in the worker ({type(exc).__name__}); this is a fault of the service, not known to "
        f"come from your spec: create the job again, and if it fails the same way, give the operator its id "
        f"({job_id}), whose traceback the worker log has"
    )


class RanksGaveUp(Exception):
    """The job's processes gave the job up, as ``claim_and_run`` does in-process when the store or
    the database stays out of reach: the sweeper re-queues it once its heartbeat is stale."""


class RankCrashed(Exception):
    """A process of the job raised an error the worker did not expect (its traceback is in the
    worker's log, where the processes write)."""


def train_on_processes(job_id: str, worker: str, job_dir: Path, *, nproc: int) -> TrainResult:
    """Train the claimed job on ``nproc`` processes (``python -m worker.rank``, one per device) and
    return what rank 0 reached, or raise what the in-process ``train`` would: ``TrainingError``,
    ``ConfigError``, ``LeaseLost``, with the processes' reason (``RanksGaveUp`` or ``RankCrashed``
    for the rest). A process killed, with no reason of its own, is a ``TrainingError`` naming it.

    The worker's heartbeat keeps the lease meanwhile. Should it find the lease gone, rank 0 learns
    it from the job record itself: its next step's ``record_step`` is refused (``LeaseLost``)."""
    paths = [outcome_path(job_dir, rank) for rank in range(nproc)]
    for path in paths:  # an earlier attempt's
        path.unlink(missing_ok=True)
    failed: LaunchFailed | None = None
    try:
        launch(["-m", "worker.rank", job_id, worker], nproc=nproc)
    except LaunchFailed as exc:
        failed = exc
    outcomes = {rank: json.loads(path.read_text()) for rank, path in enumerate(paths) if path.exists()}
    for path in paths:
        path.unlink(missing_ok=True)
    errors = [(rank, outcome) for rank, outcome in sorted(outcomes.items()) if "error" in outcome]
    # A process that lost its peers (one killed) fails in a collective, an "internal" error that
    # says less than the launcher's account of which one died.
    for rank, outcome in errors:
        if outcome["kind"] == "config":
            raise ConfigError(outcome["param"], outcome["error"])
        if outcome["kind"] == "training":
            raise TrainingError(outcome["error"])
        if outcome["kind"] == "lease_lost":
            raise LeaseLost(job_id)
        if outcome["kind"] == "gave_up":
            raise RanksGaveUp(f"rank {rank}: {outcome['error']}")
    if failed is not None:
        raise TrainingError(f"the job's processes failed: {failed}{killed_hint(failed)}")
    if errors:
        rank, outcome = errors[0]
        raise RankCrashed(f"rank {rank}: {outcome['error']}")
    if 0 not in outcomes:
        raise RankCrashed("rank 0 ended without recording its outcome")
    done = outcomes[0]
    return TrainResult(
        final_step=done["final_step"],
        stopped=done["stopped"],
        checkpoint=None if done["checkpoint"] is None else Path(done["checkpoint"]),
        best_checkpoint=None if done["best_checkpoint"] is None else Path(done["best_checkpoint"]),
    )


def killed_hint(failed: LaunchFailed) -> str:
    """What a user can do about a process killed by SIGKILL (``LaunchFailed.signals``), which left
    no reason of its own: the kernel's out-of-memory killer sends it (a GPU out of memory is the
    trainer's own reason, above)."""
    if "SIGKILL" not in failed.signals:
        return ""
    return (
        ". A process killed by SIGKILL was stopped from outside the trainer, most likely because the "
        "machine ran out of memory: create the job again with less memory per step (lower "
        "prompts_per_step or group_size, shorten max_completion_length, or turn on LoRA or "
        "gradient_checkpointing), or ask the operator whether it was stopped by hand"
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

    def say_given_up(cause: str) -> None:
        """Why this attempt gives the job up, on its record (the user's events, and the sweeper's
        reason should the job fail), best effort: the job is given up either way."""
        try:
            write(lambda session: record_given_up(session=session, job_id=job_id, worker=worker, cause=cause))
        except Exception:
            log.warning("job %s: could not record why it was given up", job_id, exc_info=True)

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
        with (
            Heartbeat(
                sessions=sessions,
                job_id=job_id,
                worker=worker,
                interval=settings.heartbeat_interval_s,
                on_lost=progress.lease_lost.set,
            ),
            job_files_in_use(job_id=job_id, spec=job.spec, settings=settings, store=store),
        ):
            prepare()
            run = run_config_for(job, settings)
            try:
                if len(job.devices) > 1:  # one process per device; lease loss: see train_on_processes
                    result = train_on_processes(job_id, worker, job_dir, nproc=len(job.devices))
                else:
                    result = train(
                        run,
                        job_dir,
                        progress=progress,
                        resume=True,
                        # the device the job's record names: one that cannot be used fails the job
                        # rather than training elsewhere (a GPU worker whose CUDA will not start)
                        device=usable_device(job.devices[0]),
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
    except RanksGaveUp as exc:
        log.warning("job %s: giving the job up, as its processes did (%s)", job_id, exc)
        say_given_up(f"its processes gave up ({exc})")
        return
    except StoreUnavailable as exc:
        log.exception(
            "job %s: the artifact store became unreachable; giving the job up (the sweeper re-queues "
            "it once its heartbeat is stale, and the next attempt resumes from its newest stored checkpoint)",
            job_id,
        )
        say_given_up(f"the artifact store was out of reach ({exc}); the service's operator can check it")
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
