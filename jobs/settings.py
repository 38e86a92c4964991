"""The service's configuration: one object, read from ``GRPO_*`` environment variables.

The defaults are the embedded setup (a SQLite file, the filesystem broker and an artifact
directory, all under ``data_dir``); production sets ``GRPO_DATABASE_URL`` and ``GRPO_BROKER_URL``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRPO_", env_file=".env", extra="ignore")

    data_dir: Path = Path("var")
    database_url: str = ""  # empty: sqlite:///<data_dir>/grpo.db
    broker_url: str = "filesystem://"
    broker_dir: Path | None = None  # filesystem broker folders; None: <data_dir>/broker
    broker_key_prefix: str = ""  # Redis: prefix every key (isolates test runs sharing one Redis)
    artifact_dir: Path | None = None  # datasets and job outputs; None: <data_dir>/artifacts
    queue: str = "gpu"  # the Celery queue GPU workers consume

    # Leases: a running job's worker writes a heartbeat every heartbeat_interval_s; one older
    # than heartbeat_stale_s means the worker is gone and the sweeper re-queues the job.
    heartbeat_interval_s: float = 10.0
    heartbeat_stale_s: float = 120.0
    sweep_interval_s: float = 15.0
    send_grace_s: float = 30.0  # a queued job never marked sent is re-sent after this long
    resend_after_s: float = 1800.0  # a queued job is re-sent this long after its last send
    visibility_timeout_s: int = 6 * 3600
    max_attempts: int = 3  # worker losses before a job is failed instead of re-queued

    # Limits
    max_dataset_bytes: int = 512 * 1024 * 1024
    event_poll_interval_s: float = 0.5  # server-sent events: how often the stream looks for news

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'grpo.db'}"
        if self.broker_dir is None:
            self.broker_dir = self.data_dir / "broker"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
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
