"""Request and response bodies of the HTTP API (pydantic), with the examples OpenAPI shows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictInt

from jobs.models import Job, JobStatus, WebhookStatus
from jobs.text import STORABLE, StorableStr
from trainer.config import GRPOConfig
from trainer.rewards import validate_reward_specs

T = TypeVar("T")

REWARD_EXAMPLE = [
    {"type": "exact_match", "weight": 1.0, "extract": "last_number"},
    {"type": "regex", "weight": 0.2, "pattern": "^<think>.*</think>"},
]
HYPERPARAMETERS_EXAMPLE = {
    "max_steps": 200,
    "prompts_per_step": 8,
    "learning_rate": 1e-6,
    "max_completion_length": 256,
    "beta": 0.04,
    "checkpoint_every": 50,
}
# A bound on a job's `gpus` that keeps it an integer every database stores; the real limit is the
# largest live worker's (jobs.submission.check_devices).
MAX_GPUS = 1 << 16
DEFAULT_HYPERPARAMETERS = GRPOConfig()  # what a job gets for the hyperparameters its request leaves out


def job_hyperparameters(job: Job) -> dict[str, Any]:
    """The hyperparameters ``job`` runs with, every one: its stored spec's (complete when it was
    created, ``jobs.submission.stored_spec``), over the default of any hyperparameter added since,
    which ``GRPOConfig.from_dict`` fills the same way when the job runs."""
    return {**DEFAULT_HYPERPARAMETERS.to_dict(), **job.spec["hyperparameters"]}


class Page(BaseModel, Generic[T]):
    """A page of a list, newest first; pass the last id as ``after`` to get the next one."""

    data: list[T]
    has_more: bool


class DatasetOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "ds_0193a5c1f00a7f3e2b9c4d1e",
                    "object": "dataset",
                    "name": "arith.jsonl",
                    "rows": 1000,
                    "bytes": 48213,
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "fields": ["answer", "prompt"],
                    "created_at": "2025-01-01T12:00:00Z",
                }
            ]
        },
    )

    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    rows: int
    bytes: int
    sha256: str
    fields: list[str] = Field(description="Fields present in every row: what rewards can read.")
    created_at: datetime


class JobCreate(BaseModel):
    """A GRPO job: which model, which data, which rewards, which hyperparameters."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "arith-grpo",
                    "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
                    "dataset_id": "ds_0193a5c1f00a7f3e2b9c4d1e",
                    "reward": REWARD_EXAMPLE,
                    "group_size": 8,
                    "hyperparameters": HYPERPARAMETERS_EXAMPLE,
                }
            ]
        },
    )

    name: StorableStr | None = Field(None, max_length=255)
    base_model: StorableStr = Field(
        min_length=1,
        max_length=1024,
        description="A Hugging Face hub id (org/name), or a model directory under one "
        "this server's operator allows (GRPO_MODEL_DIRS).",
    )
    dataset_id: StorableStr = Field(max_length=32)
    eval_dataset_id: StorableStr | None = Field(None, max_length=32)
    reward: Annotated[list[dict[str, Any]], STORABLE] = Field(
        min_length=1,
        examples=[REWARD_EXAMPLE],
        description="Reward functions, each with a `type` and a `weight`.",
    )
    # strict, as the hyperparameters' integers are (trainer.config): "2" or true is not a group size
    group_size: StrictInt | None = Field(
        None, description="Completions sampled per prompt (G >= 2); default 8."
    )
    hyperparameters: Annotated[dict[str, Any], STORABLE] = Field(
        default_factory=dict, examples=[HYPERPARAMETERS_EXAMPLE]
    )
    gpus: StrictInt = Field(  # strict, as group_size: "2" or true is not a device count
        1,
        ge=1,
        le=MAX_GPUS,
        description=(
            "Devices the job trains on, as one model sharded across them: GPUs, or on a worker without "
            "CUDA that many processes. It runs on a worker with at least as many (GRPO_WORKER_DEVICES); "
            "asking for more than any live worker has is refused, naming the largest."
        ),
    )
    webhook_url: AnyHttpUrl | None = Field(None, description="POSTed when the job reaches a terminal state.")


class JobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "job_0193a5c2a1b27d9e4f0a3b2c",
                    "object": "job",
                    "name": "arith-grpo",
                    "status": "running",
                    "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
                    "dataset_id": "ds_0193a5c1f00a7f3e2b9c4d1e",
                    "eval_dataset_id": None,
                    "reward": validate_reward_specs(REWARD_EXAMPLE),
                    "group_size": 8,
                    "hyperparameters": {**DEFAULT_HYPERPARAMETERS.to_dict(), **HYPERPARAMETERS_EXAMPLE},
                    "webhook_url": None,
                    "webhook_status": None,
                    "step": 42,
                    "max_steps": 200,
                    "attempts": 1,
                    "gpus": 2,
                    "worker": "celery@gpu-0/4242",
                    "devices": ["cuda:0", "cuda:1"],
                    "heartbeat_at": "2025-01-01T12:10:00Z",
                    "cancel_requested": False,
                    "pause_requested": False,
                    "failure_reason": None,
                    "latest_metrics": {"reward": 0.41, "kl": 0.002},
                    "best_checkpoint_step": None,
                    "created_at": "2025-01-01T12:00:00Z",
                    "started_at": "2025-01-01T12:00:03Z",
                    "finished_at": None,
                }
            ]
        }
    )

    id: str
    object: Literal["job"] = "job"
    name: str | None
    status: JobStatus
    base_model: str
    dataset_id: str
    eval_dataset_id: str | None
    reward: list[dict[str, Any]] = Field(
        description="The reward functions as the job runs them: every option, defaults filled, a name each."
    )
    group_size: int = Field(description="Completions sampled per prompt: `hyperparameters.group_size`.")
    hyperparameters: dict[str, Any] = Field(
        description=(
            "The hyperparameters the job runs with: every one, those the request left out at their "
            "defaults (`group_size` among them, wherever the request gave it)."
        )
    )
    webhook_url: str | None
    webhook_status: WebhookStatus | None = Field(
        None,
        description=(
            "Once a job with a webhook_url has ended: `pending` (retried with backoff), `delivered`, or "
            "`failed` (given up); each attempt is an event of kind `webhook`."
        ),
    )
    step: int = Field(description="The last step whose metrics are recorded.")
    max_steps: int
    attempts: int
    gpus: int = Field(description="Devices the job asked for.")
    worker: str | None
    devices: list[str] | None = Field(
        description=(
            "The devices its latest run was given, as its worker names them (`cuda:0`, ...; `cpu` once per "
            "process on a worker without CUDA); null until a worker takes it."
        )
    )
    heartbeat_at: datetime | None
    cancel_requested: bool
    pause_requested: bool = Field(description="Running, and asked to pause: it stops after its current step.")
    failure_reason: str | None
    latest_metrics: dict[str, float | None] | None
    best_checkpoint_step: int | None = Field(
        None,
        description=(
            "The best checkpoint so far by `hyperparameters.keep_best_by` "
            "(null: not set, or nothing evaluated yet)."
        ),
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_job(cls, job: Job, latest_metrics: dict[str, float | None] | None = None) -> JobOut:
        hyperparameters = job_hyperparameters(job)
        return cls(
            id=job.id,
            name=job.name,
            status=JobStatus(job.status),
            base_model=job.base_model,
            dataset_id=job.dataset_id,
            eval_dataset_id=job.eval_dataset_id,
            reward=job.spec["reward"],
            group_size=hyperparameters["group_size"],
            hyperparameters=hyperparameters,
            webhook_url=job.webhook_url,
            webhook_status=job.webhook_status,
            step=job.step,
            max_steps=job.max_steps,
            attempts=job.attempts,
            gpus=job.gpus,
            worker=job.worker,
            devices=job.devices,
            heartbeat_at=job.heartbeat_at,
            cancel_requested=job.cancel_requested,
            pause_requested=job.pause_requested,
            failure_reason=job.failure_reason,
            latest_metrics=latest_metrics,
            best_checkpoint_step=job.best_checkpoint_step,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class MetricsOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {"step": 3, "metrics": {"reward": 0.5, "reward_std": 0.2, "kl": 0.001, "loss": 0.01}}
            ]
        },
    )

    step: int
    metrics: dict[str, float | None]
    created_at: datetime


class EventOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "job_id": "job_0193a5c2a1b27d9e4f0a3b2c",
                    "level": "info",
                    "kind": "status",
                    "message": "running on celery@gpu-0/4242 (cuda:0, cuda:1; attempt 1)",
                    "data": {"status": "running", "devices": ["cuda:0", "cuda:1"]},
                    "created_at": "2025-01-01T12:00:03Z",
                }
            ]
        },
    )

    id: int
    job_id: str
    level: str
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class CheckpointOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "step": 50,
                    "kind": "adapter",
                    "bytes": 8811200,
                    "created_at": "2025-01-01T12:30:00Z",
                    "download_url": "https://grpo.example.com/v1/jobs/job_0193a5c2a1b27d9e4f0a3b2c/checkpoints/50/download",
                    "merged_download_url": "https://grpo.example.com/v1/jobs/job_0193a5c2a1b27d9e4f0a3b2c/checkpoints/50/download?format=merged",
                    "eval": {"reward": 0.62, "pass@1": 0.55, "pass@4": 0.81},
                    "best": True,
                }
            ]
        }
    )

    step: int
    kind: Literal["model", "adapter"] = Field(
        description="`model`: every parameter was trained, a full model. `adapter`: a LoRA (PEFT) adapter."
    )
    bytes: int
    created_at: datetime
    download_url: str = Field(
        description="The checkpoint as it is: the full model, or the adapter alone. An "
        "absolute URL (this server's address as the request reached it)."
    )
    merged_download_url: str | None = Field(
        None,
        description=(
            "A LoRA job's adapter merged into its base model, a plain model for `from_pretrained`: written "
            "for the final checkpoint when the job succeeds. Null for other checkpoints and for full models."
        ),
    )
    eval: dict[str, float | None] | None = Field(
        None,
        description=(
            "Its figures on the job's eval set (`eval_dataset_id`): `reward`, the mean reward of one greedy "
            "completion per eval row; `pass@1` and `pass@k` with `eval_pass_k`; `rewards/<name>` per reward "
            "function. Null without an eval set."
        ),
    )
    best: bool = Field(
        False,
        description=(
            "The best checkpoint by the job's `keep_best_by`: kept beyond `keep_last_checkpoints`, and what "
            "the client downloads by default."
        ),
    )


class SampleOut(BaseModel):
    """One completion a job's worker kept from a step (the first of a few groups), with its rewards."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 12,
                    "object": "sample",
                    "job_id": "job_0193a5c2a1b27d9e4f0a3b2c",
                    "step": 3,
                    "prompt": "What is 2 + 3?",
                    "completion": "<think>2 plus 3</think> 5",
                    "reward": 1.2,
                    "advantage": 0.87,
                    "rewards": {"exact_match": 1.0, "regex": 1.0},
                    "truncated": False,
                    "created_at": "2025-01-01T12:01:00Z",
                }
            ]
        }
    )

    id: int
    object: Literal["sample"] = "sample"
    job_id: str
    step: int
    prompt: Any = Field(description="The prompt as the model saw it.")
    completion: str
    reward: float | None = Field(description="The weighted total of the reward functions.")
    advantage: float | None = Field(description="The reward relative to its group (what the update used).")
    rewards: dict[str, float | None] = Field(
        description="Each reward function's unweighted score; null: it errored."
    )
    truncated: bool | None = Field(description="The completion hit max_completion_length.")
    created_at: datetime


class RewardRunSample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion: StorableStr = Field(max_length=100_000)
    prompt: Annotated[str | list[dict[str, Any]] | None, STORABLE] = Field(
        None, description="Defaults to the row's `prompt`; chat messages are joined by their contents."
    )
    row: Annotated[dict[str, Any], STORABLE] = Field(
        default_factory=dict, description="The dataset row: the fields rewards read."
    )


class RewardRunIn(BaseModel):
    """Reward functions (as in a job spec) and completions to score with them."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "reward": REWARD_EXAMPLE,
                    "samples": [
                        {
                            "prompt": "What is 2 + 3?",
                            "completion": "<think>2 plus 3</think> 5",
                            "row": {"answer": "5"},
                        },
                        {"prompt": "What is 2 + 3?", "completion": "6", "row": {"answer": "5"}},
                    ],
                }
            ]
        },
    )

    reward: Annotated[list[dict[str, Any]], STORABLE] = Field(min_length=1, examples=[REWARD_EXAMPLE])
    samples: list[RewardRunSample] = Field(min_length=1)


class RewardScore(BaseModel):
    total: float = Field(description="The weighted sum of the parts; a part that errored counts 0.")
    parts: dict[str, float | None] = Field(description="Each function's unweighted score; null: it errored.")
    errors: list[str] = Field(description="The functions that errored on this sample (see error_messages).")


class RewardRunOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "reward_run",
                    "reward": [
                        {
                            "type": "exact_match",
                            "weight": 1.0,
                            "name": "exact_match",
                            "field": "answer",
                            "extract": "last_number",
                            "marker": "####",
                            "pattern": None,
                            "flags": "",
                            "case_sensitive": False,
                        },
                        {
                            "type": "regex",
                            "weight": 0.2,
                            "name": "regex",
                            "pattern": "^<think>.*</think>",
                            "flags": "",
                            "score": "match",
                            "full_match": False,
                        },
                    ],
                    "data": [
                        {"total": 1.2, "parts": {"exact_match": 1.0, "regex": 1.0}, "errors": []},
                        {"total": 0.0, "parts": {"exact_match": 0.0, "regex": 0.0}, "errors": []},
                    ],
                    "errors": {"exact_match": 0, "regex": 0},
                    "error_messages": [],
                }
            ]
        }
    )

    object: Literal["reward_run"] = "reward_run"
    reward: list[dict[str, Any]] = Field(
        description="The specs as the trainer reads them: defaults filled, names given."
    )
    data: list[RewardScore] = Field(description="One score per sample, in order.")
    errors: dict[str, int] = Field(description="Per function, how many samples it errored on.")
    error_messages: list[str] = Field(description="A few distinct errors, as `name: message`.")


class EstimateTokens(BaseModel):
    prompt_tokens_mean: float = Field(
        description="Mean prompt length over the sampled rows, capped at "
        "max_prompt_length (the chat template's own markup not counted)."
    )
    prompt_tokens_max: int = Field(description="The longest sampled prompt, before truncation.")
    prompt_tokens_from: Literal["tokenizer", "characters"] = Field(
        description=(
            "`tokenizer`: counted with the base model's tokenizer.json; `characters`: characters / 4, a "
            "typical ratio for English and BPE tokenizers (the model is a hub id, or has no tokenizer.json)."
        )
    )
    prompts_sampled: int = Field(description="Rows of the dataset read for it (its first ones).")
    prompts_truncated: float = Field(
        description="Share of the sampled prompts longer than max_prompt_length."
    )
    completion_tokens_max: int = Field(
        description="max_completion_length: completions are counted at full "
        "length, an upper bound (they often stop earlier)."
    )
    per_step: int = Field(
        description="prompts_per_step x group_size x (prompt_tokens_mean + completion_tokens_max)."
    )
    total: int = Field(description="per_step x max_steps.")


class EstimateMemory(BaseModel):
    """What one device holds at most (with `gpus` N > 1, each of the N: see `gathered_bytes`)."""

    parameters: int
    parameters_from: Literal["safetensors", "config.json"] = Field(
        description=(
            "`safetensors`: counted from the weight files' headers (exact); `config.json`: from hidden_size, "
            "layers, vocabulary and intermediate_size (a dense transformer's count)."
        )
    )
    dtype: str = Field(
        description="What the weights train in (`auto`: float32 on a CPU worker, bfloat16 on a "
        "GPU; GRPO_WORKER_DEVICE says which this server has)."
    )
    trainable_parameters: int = Field(description="Every parameter, or LoRA's adapters alone.")
    weights_bytes: int = Field(
        description="The weights; with `gpus` N > 1, each device's shard of them (1/N), as of the "
        "reference, the gradients and the optimizer's state."
    )
    reference_model_bytes: int = Field(
        description="A frozen copy of the weights when beta > 0 without LoRA "
        "(LoRA's reference is the base with its adapters off: no copy)."
    )
    gradients_bytes: int = Field(
        description="The trainable parameters' gradients, in the training dtype (LoRA's adapters "
        "are float32: 4 bytes each)."
    )
    optimizer_bytes: int = Field(
        description="AdamW's state in float32 per trainable parameter: its two moments (8 bytes) "
        "and, for a bfloat16 or float16 model, a float32 master copy of the weight, which each step "
        "updates before rounding it into the model (12 bytes in all). A float32 model, or LoRA's "
        "float32 adapters: 8 bytes."
    )
    activations_bytes: int = Field(
        description="One forward/backward's saved activations: a micro-batch of whole "
        "groups, about 8192 tokens (fewer kept with gradient_checkpointing)."
    )
    generation_cache_bytes: int = Field(
        description="The key/value cache while prompts_per_step x group_size completions are sampled "
        "(with `gpus` N > 1, a device's share: ceil(prompts_per_step / N) prompts' groups)."
    )
    gathered_bytes: int = Field(
        0,
        description="With `gpus` > 1: the full weights a device gathers beside its shards to "
        "generate (0 on one device, where nothing is sharded).",
    )
    training_gathered_bytes: int = Field(
        0,
        description="With `gpus` > 1: what a device gathers beside its shards to train: the "
        "embeddings, final norm and LM head and two decoder layers at a time, weights and gradients.",
    )
    generation_engine_bytes: int = Field(
        0,
        description="With `generation: vllm`: the vLLM engine's own copy of the weights and its KV "
        "cache (`vllm_kv_cache_gib`), on the same device (0 with the `hf` sampler). Not counted: "
        "vLLM's compiled graphs and its runtime (on a GPU ~1-2 GiB).",
    )
    total_bytes: int = Field(
        description="Weights, reference, gradients and optimizer, plus the larger of the "
        "activations (with `training_gathered_bytes`, and a vLLM engine awake while the policy "
        "trains) and the generation cache (with `gathered_bytes`; a vLLM engine's instead): they "
        "are not held at once."
    )


class EstimateTime(BaseModel):
    tokens_per_second: float = Field(
        description="The throughput assumed for this model on this server's workers."
    )
    tokens_per_second_from: str = Field(
        description="Where it comes from: your finished jobs of this base_model, "
        "or GRPO_WORKER_TOKENS_PER_S scaled to the model's size."
    )
    seconds_per_step: float
    total_seconds: float


class JobEstimate(BaseModel):
    """What a job would need, answered by ``POST /v1/jobs?dry_run=true``: nothing is created or queued."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "job.estimate",
                    "base_model": "/models/qwen2.5-0.5b",
                    "gpus": 1,
                    "tokens": {
                        "prompt_tokens_mean": 61.4,
                        "prompt_tokens_max": 143,
                        "prompt_tokens_from": "tokenizer",
                        "prompts_sampled": 200,
                        "prompts_truncated": 0.0,
                        "completion_tokens_max": 256,
                        "per_step": 20345,
                        "total": 4069000,
                    },
                    "memory": {
                        "parameters": 494032768,
                        "parameters_from": "safetensors",
                        "dtype": "bfloat16",
                        "trainable_parameters": 494032768,
                        "weights_bytes": 988065536,
                        "reference_model_bytes": 988065536,
                        "gradients_bytes": 988065536,
                        "optimizer_bytes": 5928393216,
                        "activations_bytes": 1283457024,
                        "generation_cache_bytes": 249823232,
                        "total_bytes": 10176046848,
                    },
                    "time": {
                        "tokens_per_second": 5200.0,
                        "tokens_per_second_from": "GRPO_WORKER_TOKENS_PER_S (5200 tokens/s)",
                        "seconds_per_step": 3.9,
                        "total_seconds": 782.5,
                    },
                    "warnings": [],
                    "notes": ["completions are counted at max_completion_length, an upper bound"],
                }
            ]
        }
    )

    object: Literal["job.estimate"] = "job.estimate"
    base_model: str
    gpus: int = Field(
        1,
        description="Devices the job would train on; the memory figures are one device's, the time "
        "the job's.",
    )
    tokens: EstimateTokens
    memory: EstimateMemory | None = Field(
        description="Null when base_model is a hub id: the figures need its "
        "config.json, which this server does not download (see notes)."
    )
    time: EstimateTime
    warnings: list[str] = Field(
        description="What would go wrong or be cut: lengths beyond the model's context, "
        "prompts truncated, no room for another active job."
    )
    notes: list[str] = Field(description="How each figure was estimated.")


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorOut(BaseModel):
    """Every 4xx and 5xx response has this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_request",
                        "message": "must be >= 2, got 1",
                        "param": "group_size",
                    }
                }
            ]
        }
    )

    error: ErrorBody
