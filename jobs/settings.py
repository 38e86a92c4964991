"""The service's configuration: one object, read from ``GRPO_*`` environment variables.

The defaults are the embedded setup (a SQLite file, the filesystem broker and an artifact
directory, all under ``data_dir``); production sets ``GRPO_DATABASE_URL`` and ``GRPO_BROKER_URL``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRPO_", env_file=".env", extra="ignore")

    data_dir: Path = Path("var")
    database_url: str = ""  # empty: sqlite:///<data_dir>/grpo.db
    broker_url: str = "filesystem://"
    broker_dir: Path | None = None  # filesystem broker folders; None: <data_dir>/broker
    broker_key_prefix: str = ""  # Redis: prefix every key (isolates test runs sharing one Redis)
    artifact_dir: Path | None = None  # datasets and job outputs; None: <data_dir>/artifacts
    # Artifacts in an S3-compatible object store (jobs/store.py), for API processes and workers on
    # several machines: "s3://bucket" or "s3://bucket/prefix". Unset: artifact_dir alone holds them
    # (it must then be one directory every process shares); set: artifact_dir is each process's
    # local cache of the store. Credentials unset: boto3's own chain (AWS_* variables, an instance
    # role). The endpoint is for stores other than AWS S3 (SeaweedFS, MinIO, ...).
    store_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_region: str | None = None
    # Dataset downloads (GET /v1/files/{id}/content) answer with a 307 to a presigned URL of the
    # store instead of passing the bytes through the API, valid this long. The URL names the
    # endpoint clients reach: s3_public_endpoint_url when the API's own (s3_endpoint_url) is an
    # address only the servers can reach (a compose service name).
    store_presigned_downloads: bool = False
    store_presigned_expiry_s: int = Field(900, ge=1, le=7 * 24 * 3600)
    s3_public_endpoint_url: str | None = None
    # With a store, a worker's artifact_dir (its cache of the store) holds at most this many GiB:
    # past it, whole artifacts (datasets, checkpoints, merged models) that are safely in the store
    # and in use by no process of that directory are evicted, least recently used first
    # (jobs/cache.py). 0: unbounded. Without a store it never applies: the directory is the storage.
    store_cache_gib: float = Field(50.0, ge=0)
    # The Celery queue of one-device jobs; a job asking for N devices (its spec's `gpus`) goes to
    # "<queue>.gpus-N" (jobs.broker.train_queue), and a worker consumes those of every size it can run.
    queue: str = "gpu"
    # A training worker's devices: N GPUs (cuda:0..N-1 as it sees them), or on a machine without CUDA
    # N processes. None: every CUDA device torch sees, else 1 (worker/devices.py). It takes the jobs
    # asking for at most N; the API refuses a job asking for more than any live worker has.
    worker_devices: int | None = Field(None, ge=1)
    # Results of chat completions come back through this Celery result backend; empty: the broker's
    # Redis (redis:// brokers), else a directory under data_dir (file://, for the filesystem broker).
    result_backend: str = ""

    # Leases: a running job's worker writes a heartbeat every heartbeat_interval_s; one older
    # than heartbeat_stale_s means the worker is gone and the sweeper re-queues the job.
    heartbeat_interval_s: float = 10.0
    heartbeat_stale_s: float = 120.0
    sweep_interval_s: float = 15.0
    send_grace_s: float = 30.0  # a queued job never marked sent is re-sent after this long
    resend_after_s: float = 1800.0  # a queued job is re-sent this long after its last send
    visibility_timeout_s: int = 6 * 3600
    max_attempts: int = 3  # worker losses before a job is failed instead of re-queued
    # A running job's worker retries database writes this long (backing off) when the database
    # is unreachable, then gives the job up; the sweeper re-queues it once its heartbeat is stale.
    database_retry_s: float = 120.0
    # Pooled database connections per process; the API runs at most this many requests' database
    # work at once (its thread pool is sized to match), so no request waits for or opens one.
    database_pool_size: int = 20
    # Each API process keeps the answers of the polled job routes (a job, its metrics) until
    # PostgreSQL notifies that the job changed: up to this many MiB. 0: off. (SQLite: always off.)
    response_cache_mb: float = Field(64.0, ge=0)

    # Authentication. "required": every /v1 request carries an API key (`grpo keys create`), and
    # what it creates belongs to the key's owner. "disabled": everything belongs to one local
    # owner, and `grpo serve` refuses to listen beyond loopback.
    auth: Literal["required", "disabled"] = "required"
    api_key_cache_s: float = (
        10.0  # an API process trusts a checked key this long: revoking takes effect within it
    )
    rate_limit_per_s: float = 20.0  # requests per second per API key, sustained; 0: no rate limit
    rate_limit_burst: int = 100  # requests a key may send at once before the rate applies
    idempotency_ttl_s: float = 24 * 3600  # how long an Idempotency-Key returns the first response

    # Limits: each refusal names the setting. The hyperparameter caps are upper bounds on the
    # job spec's fields of the same names.
    max_dataset_bytes: int = 512 * 1024 * 1024
    max_dataset_rows: int = 1_000_000
    # One dataset line (row), checked on its bytes before it is parsed, so that checking an upload
    # takes memory for one line whatever the file's size: its length, how deep its JSON nests, and
    # how many JSON values (fields, list items, objects and lists) it holds.
    max_dataset_line_bytes: int = Field(1024 * 1024, ge=1)
    max_dataset_depth: int = Field(32, ge=2)
    max_dataset_row_values: int = Field(10_000, ge=2)
    max_request_bytes: int = 1024 * 1024  # any request body but a dataset upload
    max_group_size: int = 64
    max_prompts_per_step: int = 1024
    max_steps: int = 100_000
    max_prompt_length: int = 8192
    max_completion_length: int = 8192
    max_active_jobs_per_owner: int = 8  # queued or running at once

    # What a job's estimate (POST /v1/jobs?dry_run=true) assumes of the workers. Throughput: the
    # trainer's tokens_per_second (prompt tokens x G + completion tokens a second) for a model of
    # worker_tokens_per_s_params parameters; the estimate scales it inversely with a model's size.
    # The default is bench/RESULTS.md's `realistic` config (24.3M parameters) on one CPU thread,
    # 657 tokens/s; set it from a job on your workers (its tokens_per_second metric, and its model's
    # size). Your finished jobs of the same base_model, when there are some, are used instead.
    worker_tokens_per_s: float = Field(650.0, gt=0)
    worker_tokens_per_s_params: float = Field(24.3e6, gt=0)
    worker_device: Literal["cpu", "cuda"] = (
        "cpu"  # what dtype "auto" becomes: float32 on cpu, bfloat16 on cuda
    )
    event_poll_interval_s: float = 0.5  # server-sent events: how often the stream looks for news
    # Per API key and API process: event streams open at once (each polls the database every
    # event_poll_interval_s); past it, 429. Counted in each process, like reward dry-runs: a count
    # kept in Redis would outlive a killed process's streams.
    max_event_streams_per_key: int = Field(8, ge=1)
    # The reward dry-run (POST /v1/rewards/run) scores in the API process: a bounded batch, and
    # only a few batches at once, so that code_tests sandboxes cannot starve the other routes.
    max_reward_run_samples: int = 64
    max_reward_run_rewards: int = 8  # reward functions in one dry-run's spec
    reward_runs_at_once: int = 2
    # One dry-run's time, from when it gets a slot: past it, its sandboxes are killed, its HTTP
    # calls cut, and the answer is a 422 naming this setting.
    reward_run_timeout_s: float = Field(60.0, gt=0)
    # Per owner (all their keys) and API process: dry-runs scoring at once; the owner's next ones
    # wait in the owner's own line (at most reward_run_queue_per_key of them), never in front of
    # another owner's; past that line, 429.
    reward_runs_per_key: int = Field(1, ge=1)
    reward_run_queue_per_key: int = Field(2, ge=0)

    # What jobs may reach, decided here and never by a job spec (a tenant writes the spec): the
    # API (dry-runs, job creation) and the workers must agree, so set them alike on both.
    # Loopback, private or link-local hosts that http rewards and webhooks may call anyway:
    # comma-separated names, or IP addresses (which then match by address).
    allow_private_hosts: Annotated[list[str], NoDecode] = []
    # Local models a job may load (base_model, a reward_model's model): directories under these,
    # comma-separated; anything else must be a hub id. Never the artifact store, even when one of
    # these contains it (it holds every owner's checkpoints). Unset: <data_dir>/models.
    model_dirs: Annotated[list[Path] | None, NoDecode] = None
    sandbox_allow_unisolated: bool = (
        False  # where namespaces are refused, run code_tests with limits only (unsafe)
    )
    sandbox_allow_network: bool = False  # a code_tests reward may ask for allow_network

    # Tracking: every job writes TensorBoard event files under its job directory; with a project
    # set here, workers also send each job's metrics to Weights & Biases (the optional `wandb`
    # package; its key and host come from wandb's own WANDB_API_KEY / WANDB_BASE_URL). Unset: off.
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline"] = "online"  # offline: runs under the job dir, for `wandb sync`

    # Webhooks (a job's webhook_url, POSTed when it ends), signed as Standard Webhooks sign: the
    # secret is "whsec_" + base64 of the key, or any other string (its UTF-8 bytes are the key).
    # None: this server sends no webhooks, and a job that asks for one is refused.
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = 10.0  # one attempt's connect and read timeout
    webhook_max_attempts: int = 12  # then the delivery is given up (an event says so)
    webhook_backoff_s: float = 5.0  # the wait after the first failed attempt, doubled after each
    webhook_max_backoff_s: float = 3600.0

    # Chat completions (POST /v1/chat/completions) are answered by inference workers
    # (`grpo worker --inference`) on their own queue, so that training workers stay on jobs.
    inference_queue: str = "inference"
    # How long the API waits for an answer; past it the request is a 504 (and the message, if no
    # worker took it by then, is dropped unanswered rather than answered for nobody).
    inference_timeout_s: float = Field(120.0, gt=0)
    inference_models: int = Field(
        2, ge=1
    )  # checkpoints an inference worker keeps loaded (least recently used goes)
    max_chat_tokens: int = Field(512, ge=1)  # a chat completion's max_tokens: the cap, and the default
    max_chat_choices: int = Field(4, ge=1)  # a chat completion's n
    # "vllm": an inference worker answers LoRA jobs' checkpoints from one vLLM engine per base model,
    # each job's adapter loaded into it on first use, many side by side (worker/vllm_serving.py);
    # full-model checkpoints still load with transformers. Needs vLLM's environment (`make
    # vllm-setup`, or GRPO_VLLM_PYTHON): the worker refuses to start without it. An engine keeps at
    # most inference_vllm_max_loras adapters (the least recently used is unloaded) and a KV cache of
    # inference_vllm_kv_cache_gib; inference_models caps the engines (base models) it keeps running.
    inference_backend: Literal["hf", "vllm"] = "hf"
    inference_vllm_max_loras: int = Field(8, ge=1)
    inference_vllm_kv_cache_gib: float = Field(1.0, gt=0)

    @field_validator(
        "webhook_secret",
        "wandb_project",
        "wandb_entity",
        "store_url",
        "s3_endpoint_url",
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_region",
        "s3_public_endpoint_url",
        "worker_devices",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value  # compose passes an unset variable as ""

    @field_validator("store_url")
    @classmethod
    def _check_store_url(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("s3://") or not value[len("s3://") :].strip("/")):
            raise ValueError(
                f"GRPO_STORE_URL: {value!r} is not an object store URL; give s3://BUCKET or "
                "s3://BUCKET/PREFIX (and GRPO_S3_ENDPOINT_URL for a store other than AWS S3), "
                "or leave it unset to keep artifacts in GRPO_ARTIFACT_DIR alone"
            )
        return value

    @field_validator("allow_private_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            value = [str(host).strip().lower() for host in value if str(host).strip()]
            for host in value:
                if any(char in host for char in "/@? \t") or host.count(":") == 1:
                    raise ValueError(
                        f"GRPO_ALLOW_PRIVATE_HOSTS: {host!r} is not a host name or an IP address; "
                        "give names or addresses without scheme, port or path, "
                        'e.g. "127.0.0.1,scorer.internal"'
                    )
        return value

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()] or None
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'grpo.db'}"
        if self.broker_dir is None:
            self.broker_dir = self.data_dir / "broker"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        if self.model_dirs is None:
            self.model_dirs = [self.data_dir / "models"]
        if not self.result_backend:
            self.result_backend = (
                self.broker_url
                if self.broker_url.startswith(("redis://", "rediss://"))
                else f"file://{(self.data_dir / 'results').resolve()}"
            )
        return self

    @property
    def datasets_dir(self) -> Path:
        assert self.artifact_dir is not None
        return self.artifact_dir / "datasets"

    def job_dir(self, job_id: str) -> Path:
        assert self.artifact_dir is not None
        return self.artifact_dir / "jobs" / job_id

    def dataset_path(self, dataset_id: str) -> Path:
        return self.datasets_dir / f"{dataset_id}.jsonl"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` after changing the env."""
    return Settings()
