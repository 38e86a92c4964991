"""This server's datasets, jobs, events and checkpoints as OpenAI's objects (files, fine-tuning
jobs, their events and checkpoints), with this server's extensions beside OpenAI's fields."""

from __future__ import annotations

from datetime import datetime

from api.openai.schemas import FileOut, FineTuningCheckpointOut, FineTuningJobEventOut, FineTuningJobOut
from jobs.chat import checkpoint_model_name
from jobs.models import Checkpoint, Dataset, Job, JobEvent, JobStatus
from jobs.schemas import job_hyperparameters


def unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def file_object(dataset: Dataset) -> FileOut:
    return FileOut(
        id=dataset.id,
        bytes=dataset.bytes,
        created_at=unix(dataset.created_at),
        filename=dataset.name,
        rows=dataset.rows,
        fields=dataset.fields,
    )


def job_object(
    job: Job, *, now: datetime, latest_metrics: dict[str, float | None] | None = None
) -> FineTuningJobOut:
    """``latest_metrics``: the job's metrics at the step it reached, whose cumulative ``num_tokens``
    is OpenAI's ``trained_tokens`` once the job has ended (null before, as OpenAI has it)."""
    extra, native = job.spec.get("openai") or {}, job_hyperparameters(job)
    method = extra.get("method") or {
        "type": "reinforcement",
        "reinforcement": {
            "grader": None,
            "hyperparameters": {
                "n_epochs": "auto",
                "batch_size": native["prompts_per_step"],
                "learning_rate_multiplier": "auto",
            },
        },
    }
    shown = method["reinforcement"]["hyperparameters"]
    status = JobStatus(job.status)
    error = None
    if status == JobStatus.failed:
        error = {"code": "job_failed", "message": job.failure_reason or "the job failed", "param": None}
    trained_tokens = None
    if status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled) and latest_metrics:
        seen = latest_metrics.get("num_tokens")
        trained_tokens = int(seen) if seen is not None else None
    estimated = None
    if status == JobStatus.running and job.started_at is not None and job.step > 0:
        elapsed = (now - job.started_at).total_seconds()
        estimated = unix(job.started_at) + int(elapsed * job.max_steps / job.step)
    return FineTuningJobOut(
        id=job.id,
        created_at=unix(job.created_at),
        finished_at=unix(job.finished_at),
        model=job.base_model,
        fine_tuned_model=checkpoint_model_name(job, job.step) if status == JobStatus.succeeded else None,
        organization_id=job.owner,
        status=status,
        training_file=job.dataset_id,
        validation_file=job.eval_dataset_id,
        hyperparameters={
            key: shown.get(key, "auto") for key in ("n_epochs", "batch_size", "learning_rate_multiplier")
        },
        method=method,
        result_files=[],
        seed=native["seed"],
        trained_tokens=trained_tokens,
        error=error,
        estimated_finish=estimated,
        integrations=[],
        metadata=extra.get("metadata"),
        suffix=extra.get("suffix"),
        step=job.step,
        max_steps=job.max_steps,
        reward=job.spec["reward"],
    )


EVENT_LEVELS = {"info": "info", "warning": "warn", "error": "error"}


def event_object(event: JobEvent) -> FineTuningJobEventOut:
    return FineTuningJobEventOut(
        id=str(event.id),
        created_at=unix(event.created_at),
        level=EVENT_LEVELS.get(event.level, "info"),
        message=event.message,
        data=event.data,
        kind=event.kind,
    )


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt_{job_id}_{step}"


def checkpoint_step(checkpoint_id: str) -> int | None:
    """The step of a ``checkpoint_id``, None if it is not one."""
    step = checkpoint_id.rpartition("_")[2]
    return int(step) if checkpoint_id.startswith("ftckpt_") and step.isdigit() else None


def checkpoint_object(
    job: Job, checkpoint: Checkpoint, metrics: dict[str, float | None] | None, *, download_url: str
) -> FineTuningCheckpointOut:
    """``download_url``: the API's (``api.routes.checkpoints.download_url``), absolute."""
    metrics = metrics or {}
    return FineTuningCheckpointOut(
        id=checkpoint_id(job.id, checkpoint.step),
        created_at=unix(checkpoint.created_at),
        fine_tuned_model_checkpoint=checkpoint_model_name(job, checkpoint.step),
        fine_tuning_job_id=job.id,
        step_number=checkpoint.step,
        metrics={"step": float(checkpoint.step), "train_loss": metrics.get("loss"), **metrics},
        download_url=download_url,
    )
