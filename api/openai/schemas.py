"""Bodies of the OpenAI-compatible API (``/v1/files``, ``/v1/fine_tuning/jobs``), shaped as the
official ``openai`` SDK reads them. Fields beyond OpenAI's are this server's extensions (the SDK
keeps unknown fields; ``job.model_extra`` shows them)."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from jobs.models import JobStatus
from jobs.text import STORABLE, StorableStr

T = TypeVar("T")

METHOD_EXAMPLE = {
    "type": "reinforcement",
    "reinforcement": {
        "grader": {
            "type": "string_check",
            "name": "exact",
            "input": "{{sample.output_text}}",
            "reference": "{{item.reference_answer}}",
            "operation": "eq",
        },
        "hyperparameters": {
            "n_epochs": 2,
            "batch_size": 8,
            "learning_rate_multiplier": 1.0,
            "group_size": 8,
            "max_completion_length": 256,
        },
    },
}


class ListOut(BaseModel, Generic[T]):
    """A page, newest first; the SDK passes the last id as ``after`` to get the next one."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileOut(BaseModel):
    """An uploaded training file: one of this server's datasets (its id is the dataset's)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ds_0193a5c1f00a7f3e2b9c4d1e",
                    "object": "file",
                    "bytes": 48213,
                    "created_at": 1735732800,
                    "filename": "train.jsonl",
                    "purpose": "fine-tune",
                    "status": "processed",
                    "status_details": None,
                    "expires_at": None,
                    "rows": 1000,
                    "fields": ["messages", "prompt", "reference_answer"],
                }
            ]
        }
    )

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    rows: int = Field(description="Extension: the rows checked on upload.")
    fields: list[str] = Field(description="Extension: fields present in every row (what graders can read).")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class FineTuningJobCreate(BaseModel):
    """OpenAI's fine-tuning job request. Only ``method.type: reinforcement`` runs here (as GRPO);
    ``name`` and ``webhook_url`` are this server's extensions, and so are the hyperparameters of
    the native job spec inside ``method.reinforcement.hyperparameters`` (``group_size``,
    ``max_steps``, ``max_completion_length``, ...)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "Qwen/Qwen2.5-0.5B-Instruct",
                    "training_file": "ds_0193a5c1f00a7f3e2b9c4d1e",
                    "method": METHOD_EXAMPLE,
                    "suffix": "arith",
                    "seed": 0,
                }
            ]
        },
    )

    model: StorableStr = Field(
        min_length=1,
        max_length=1024,
        description="A Hugging Face hub id, or a model directory the workers can read.",
    )
    training_file: StorableStr = Field(min_length=1, max_length=64)
    validation_file: StorableStr | None = Field(None, max_length=64)
    method: Annotated[dict[str, Any] | None, STORABLE] = Field(None, examples=[METHOD_EXAMPLE])
    hyperparameters: Annotated[dict[str, Any] | None, STORABLE] = Field(
        None, description="OpenAI's deprecated form; give them in method.reinforcement.hyperparameters."
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: StorableStr | None = Field(None, min_length=1, max_length=64)
    metadata: Annotated[dict[str, str] | None, STORABLE] = None
    integrations: Annotated[list[dict[str, Any]] | None, STORABLE] = None
    name: StorableStr | None = Field(None, max_length=255, description="Extension: the native job's name.")
    webhook_url: AnyHttpUrl | None = Field(
        None, description="Extension: POSTed when the job reaches a terminal state."
    )


class JobErrorOut(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "job_0193a5c2a1b27d9e4f0a3b2c",
                    "object": "fine_tuning.job",
                    "created_at": 1735732800,
                    "finished_at": None,
                    "model": "Qwen/Qwen2.5-0.5B-Instruct",
                    "fine_tuned_model": None,
                    "organization_id": "alice",
                    "status": "running",
                    "training_file": "ds_0193a5c1f00a7f3e2b9c4d1e",
                    "validation_file": None,
                    "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0},
                    "method": METHOD_EXAMPLE,
                    "result_files": [],
                    "seed": 0,
                    "trained_tokens": None,
                    "error": None,
                    "estimated_finish": 1735736400,
                    "integrations": [],
                    "metadata": None,
                    "suffix": "arith",
                    "step": 42,
                    "max_steps": 250,
                    "reward": [
                        {
                            "type": "string_check",
                            "name": "exact",
                            "weight": 1.0,
                            "input": "{{sample.output_text}}",
                            "reference": "{{item.reference_answer}}",
                            "operation": "eq",
                        }
                    ],
                }
            ]
        }
    )

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None = Field(
        description="When succeeded: the final checkpoint's name (see checkpoints)."
    )
    organization_id: str
    status: JobStatus
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    result_files: list[str]
    seed: int
    trained_tokens: int | None
    error: JobErrorOut | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]]
    metadata: dict[str, str] | None
    suffix: str | None
    step: int = Field(description="Extension: the last step whose metrics are recorded.")
    max_steps: int = Field(description="Extension: the steps the job runs.")
    reward: list[dict[str, Any]] = Field(
        description="Extension: the native reward functions the grader became."
    )


class FineTuningJobEventOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "7",
                    "object": "fine_tuning.job.event",
                    "created_at": 1735732803,
                    "level": "info",
                    "message": "running on celery@gpu-0/4242 (attempt 1)",
                    "data": {"status": "running"},
                    "type": "message",
                    "kind": "status",
                }
            ]
        }
    )

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None
    type: Literal["message"] = "message"
    kind: str = Field(description="Extension: status, checkpoint, warning, ...")


class FineTuningCheckpointOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ftckpt_job_0193a5c2a1b27d9e4f0a3b2c_50",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": 1735734600,
                    "fine_tuned_model_checkpoint": (
                        "ft:Qwen2.5-0.5B-Instruct:alice:arith:job_0193a5c2a1b27d9e4f0a3b2c:ckpt-step-50"
                    ),
                    "fine_tuning_job_id": "job_0193a5c2a1b27d9e4f0a3b2c",
                    "step_number": 50,
                    "metrics": {"step": 50, "train_loss": 0.01, "reward": 0.41, "kl": 0.002},
                    "download_url": "https://grpo.example.com/v1/jobs/job_0193a5c2a1b27d9e4f0a3b2c/checkpoints/50/download",
                }
            ]
        }
    )

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float | None] = Field(
        description="step and train_loss, and every per-step metric of that step."
    )
    download_url: str = Field(
        description="Extension: the checkpoint as a tar archive, for from_pretrained; an "
        "absolute URL, so that it is not joined to the client's base_url."
    )
