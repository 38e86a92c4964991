"""Running one job: claim it, train with progress hooks under a heartbeat, record how it ended."""

from __future__ import annotations

import logging

from jobs.db import session_factory, unit_of_work
from jobs.models import JobStatus
from jobs.queries import claim_job, finish_job, prune_checkpoints
from jobs.settings import Settings
from jobs.specs import run_config_for
from trainer.config import ConfigError
from trainer.errors import TrainingError
from trainer.loop import train
from worker.heartbeat import Heartbeat
from worker.progress import JobProgress, LeaseLost

log = logging.getLogger(__name__)


def run_job(job_id: str, *, settings: Settings, worker: str) -> None:
    sessions = session_factory(settings.database_url)
    with unit_of_work(sessions) as session:
        job = claim_job(session=session, job_id=job_id, worker=worker)
    if job is None:
        # A duplicate message (a re-send, a redelivery): the job is held, finished or cancelled.
        log.info("job %s is not queued; nothing to do", job_id)
        return
    log.info("job %s: claimed by %s (attempt %d)", job_id, worker, job.attempts)
    assert settings.artifact_dir is not None
    progress = JobProgress(job_id=job_id, worker=worker, sessions=sessions, artifact_dir=settings.artifact_dir)
    status, reason = JobStatus.failed, None
    try:
        run = run_config_for(job, settings)
        with Heartbeat(sessions=sessions, job_id=job_id, worker=worker, interval=settings.heartbeat_interval_s,
                       on_lost=progress.lease_lost.set):
            result = train(run, settings.job_dir(job_id), progress=progress, resume=True)
        status = JobStatus.cancelled if result.stopped else JobStatus.succeeded
    except LeaseLost:
        log.warning("job %s: another worker holds it now; leaving it alone", job_id)
        return
    except ConfigError as exc:  # the spec passed these checks when created; a newer trainer may disagree
        reason = f"{exc.param}: {exc.message}"
    except TrainingError as exc:
        reason = str(exc)
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        reason = f"internal error ({type(exc).__name__}: {str(exc)[:300]}); the worker log has the traceback"
    with unit_of_work(sessions) as session:
        prune_checkpoints(session=session, job_id=job_id, artifact_dir=settings.artifact_dir)
        if not finish_job(session=session, job_id=job_id, worker=worker, status=status, reason=reason):
            log.warning("job %s: lease lost before it could be marked %s", job_id, status.value)
            return
    log.info("job %s: %s%s", job_id, status.value, f" ({reason})" if reason else "")
