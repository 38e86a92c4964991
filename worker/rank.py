"""``python -m worker.rank JOB_ID WORKER``: one of the processes of a job on several devices.

The worker that claimed the job starts N of these through torchrun's launcher
(``trainer.distributed.launch``, from ``worker.runner.claim_and_run``), which sets each one's
RANK, LOCAL_RANK and WORLD_SIZE; ``trainer.loop.train`` joins them. The worker keeps the lease
(its heartbeat), prepares the job's files before and merges an adapter and records the end after;
these processes only train. Rank 0 reports to the job record under the worker's name, as the
worker would in-process: a lost lease shows there as ``record_step`` refusing the step (LeaseLost),
a cancel or pause through its stop check.

Each process reads its settings from the environment it inherits from the worker (the worker's
``GRPO_*`` variables). How a process ended goes back to the worker in a file in the job
directory (``outcome_path``): rank 0's always, another's when it failed, so that the reason
shown to the user is the trainer's even when the launcher stopped rank 0 before it could write.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from jobs.db import session_factory
from jobs.models import Job
from jobs.settings import Settings
from jobs.store import StoreUnavailable, open_store
from jobs.submission import run_config_for
from trainer.config import ConfigError
from trainer.distributed import die_with_launcher
from trainer.errors import TrainingError
from trainer.loop import TrainResult, train
from trainer.progress import Progress
from worker.progress import JobProgress, LeaseLost, wandb_options
from worker.retry import DATABASE_UNREACHABLE, with_retries

log = logging.getLogger(__name__)


def outcome_path(job_dir: Path, rank: int) -> Path:
    """Where process ``rank`` of a job writes how it ended."""
    return job_dir / f".rank{rank}-outcome.json"


def failure(kind: str, exc: BaseException) -> dict[str, Any]:
    """The outcome of a process that raised ``exc``; ``kind`` tells the worker how to record it."""
    if isinstance(exc, ConfigError):
        return {"kind": kind, "error": exc.message, "param": exc.param}
    return {"kind": kind, "error": str(exc)}


def train_rank(job_id: str, worker: str, settings: Settings, *, rank: int, local_rank: int) -> dict[str, Any]:
    """Train this process's part of job ``job_id``; its outcome as ``outcome_path`` stores it."""
    assert settings.artifact_dir is not None
    sessions, job_dir = session_factory(settings.database_url), settings.job_dir(job_id)
    progress: Progress = Progress()  # the others report nothing (trainer.loop.train)
    if rank == 0:
        progress = JobProgress(
            job_id=job_id,
            worker=worker,
            sessions=sessions,
            artifact_dir=settings.artifact_dir,
            database_retry_s=settings.database_retry_s,
            store=open_store(settings),
            job_dir=job_dir,
        )
    try:
        job = with_retries(
            sessions,
            lambda session: session.get(Job, job_id),
            within_s=settings.database_retry_s,
            what=f"job {job_id}: load on rank {rank}",
        )
        assert job is not None and job.devices is not None, job_id
        device = torch.device(job.devices[local_rank])  # the device the worker recorded for this rank
        if device.type == "cuda":
            torch.cuda.set_device(device)
        run = run_config_for(job, settings)
        result: TrainResult = train(
            run,
            job_dir,
            progress=progress,
            resume=True,
            device=device,
            wandb=wandb_options(settings, job_id=job_id, job_name=run.name),
        )
    except ConfigError as exc:
        return failure("config", exc)
    except TrainingError as exc:
        return failure("training", exc)
    except LeaseLost as exc:
        return failure("lease_lost", exc)
    except (StoreUnavailable, *DATABASE_UNREACHABLE) as exc:  # the worker gives the job up
        log.exception("job %s: rank %d lost the store or the database", job_id, rank)
        return failure("gave_up", exc)
    except Exception as exc:
        log.exception("job %s crashed on rank %d", job_id, rank)
        return failure("internal", exc)
    return {
        "final_step": result.final_step,
        "stopped": result.stopped,
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
        "best_checkpoint": None if result.best_checkpoint is None else str(result.best_checkpoint),
    }


def main(argv: list[str]) -> int:
    """Exit 0 when this process trained to the end, 1 when it failed (its outcome says how)."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank {os.environ.get('RANK', '0')} %(message)s"
    )
    die_with_launcher()  # a worker killed outright takes its job's processes with it
    job_id, worker = argv
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    settings = Settings()
    outcome = train_rank(job_id, worker, settings, rank=rank, local_rank=local_rank)
    if rank == 0 or "error" in outcome:
        path = outcome_path(settings.job_dir(job_id), rank)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(outcome))
        partial.replace(path)  # the worker never reads half a file
    return 1 if "error" in outcome else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
