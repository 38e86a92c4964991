"""The service's JSON objects, as the client returns them (plain dicts, typed for editors)."""

from __future__ import annotations

from typing import Any, TypedDict


class Dataset(TypedDict):
    id: str
    name: str
    rows: int
    bytes: int
    sha256: str
    fields: list[str]
    created_at: str


class Job(TypedDict):
    id: str
    name: str | None
    status: str  # queued, running, paused, succeeded, failed, cancelled
    base_model: str
    dataset_id: str
    reward: list[dict[str, Any]]
    group_size: int
    hyperparameters: dict[str, Any]
    step: int
    max_steps: int
    attempts: int
    gpus: int  # devices the job asked for
    devices: list[str] | None  # those its latest run was given ("cuda:0", ...; "cpu" per process)
    cancel_requested: bool
    failure_reason: str | None
    latest_metrics: dict[str, float | None] | None
    best_checkpoint_step: int | None  # the best checkpoint by keep_best_by
    created_at: str
    started_at: str | None
    finished_at: str | None


class Metrics(TypedDict):
    step: int
    metrics: dict[str, float | None]
    created_at: str


class Event(TypedDict):
    id: int
    job_id: str
    level: str
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: str


class Checkpoint(TypedDict):
    step: int
    kind: str  # "model" or "adapter"
    bytes: int
    created_at: str
    download_url: str
    merged_download_url: str | None  # a LoRA job's final checkpoint, merged into its base model
    eval: dict[str, float | None] | None  # its figures on the eval set: reward, pass@k, ...
    best: bool  # the best by the job's keep_best_by: what download fetches by default


class Sample(TypedDict):
    id: int
    job_id: str
    step: int
    prompt: Any
    completion: str
    reward: float | None
    advantage: float | None
    rewards: dict[str, float | None]
    truncated: bool | None
    created_at: str


class RewardScore(TypedDict):
    total: float
    parts: dict[str, float | None]
    errors: list[str]


class RewardRun(TypedDict):
    reward: list[dict[str, Any]]
    data: list[RewardScore]
    errors: dict[str, int]
    error_messages: list[str]


class ChatCompletion(TypedDict):
    """OpenAI's chat completion object: ``choices[i]["message"]["content"]`` is a choice's text."""

    id: str
    object: str  # "chat.completion"
    created: int
    model: str  # the checkpoint that answered, by its fine_tuned_model name
    choices: list[
        dict[str, Any]
    ]  # {"index", "message": {"role", "content"}, "finish_reason": "stop" | "length"}
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens
