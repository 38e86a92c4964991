"""The job record: tables shared by the API and the workers.

The schema itself is made by the Alembic revisions in ``migrations/``; these classes must match
them (a test compares the two).
"""

from __future__ import annotations

import enum
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class WebhookStatus(enum.StrEnum):
    """Where the delivery of a job's webhook stands (none until a job with a webhook_url ends)."""

    pending = "pending"  # an attempt is due at webhook_due_at, or under way
    delivered = "delivered"
    failed = "failed"  # given up after GRPO_WEBHOOK_MAX_ATTEMPTS attempts, or refused


def utcnow() -> datetime:
    return datetime.now(UTC)


def since(seconds: float) -> datetime:
    """The moment ``seconds`` ago."""
    return utcnow() - timedelta(seconds=seconds)


def new_id(prefix: str) -> str:
    """``prefix_`` + milliseconds + randomness: unique, and sorted by creation time."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on PostgreSQL and on SQLite alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use jobs.models.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")
EventId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    """A key's secret is never stored: only its SHA-256, which is what a request is looked up by."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    owner: Mapped[str] = mapped_column(String(255))  # whose datasets and jobs the key reaches
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the secret's first characters, to recognise it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class IdempotencyKey(Base):
    """The resource a (owner, endpoint, Idempotency-Key) made, and a hash of the request that made it."""

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (Index(None, "owner", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    rows: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    fields: Mapped[list[str]] = mapped_column(JSONType)  # keys present in every row
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(repr(s.value) for s in JobStatus)})", name="status"),
        Index(None, "status", "heartbeat_at"),
        Index(None, "owner", "id"),
        Index(None, "owner", "status"),
        Index(None, "webhook_status", "webhook_due_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued)
    # The job as the trainer runs it (jobs.submission.stored_spec): the request's fields, its rewards
    # normalised, its hyperparameters complete (group_size among them), with dataset ids. The columns
    # below that repeat its fields are derived from it at insert (queries.create_job) for listing and
    # filtering, and never written again.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    base_model: Mapped[str] = mapped_column(String(1024))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    eval_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    max_steps: Mapped[int] = mapped_column(Integer)
    gpus: Mapped[int] = mapped_column(Integer)  # devices the job asks for: it goes to a worker with as many
    step: Mapped[int] = mapped_column(Integer, default=0)  # the last step whose metrics are recorded
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))  # the lease holder while running
    # the devices its latest run was given, as its worker names them: ["cuda:0", "cuda:1"], or
    # ["cpu", "cpu"] (two processes on a worker without CUDA); null until a worker claims it
    devices: Mapped[list[str] | None] = mapped_column(JSONType)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    pause_requested: Mapped[bool] = mapped_column(
        default=False
    )  # a running job stops at its next step, paused
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last message handed to the broker
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # The webhook's delivery, kept here so that no crash loses it: set pending with the terminal
    # status, in the same transaction; attempted at once, then by the sweepers when due.
    webhook_status: Mapped[str | None] = mapped_column(String(16))
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_due_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime
    )  # next attempt; a claimed one's deadline
    # the best checkpoint by the spec's keep_best_by, as the trainer last reported it (null: none chosen)
    best_checkpoint_step: Mapped[int | None] = mapped_column(Integer)


class JobMetrics(Base):
    """One row per (job, step): a step replayed after a resume overwrites its row."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    metrics: Mapped[dict[str, float]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the artifact directory
    kind: Mapped[str] = mapped_column(String(16))  # "model" or "adapter"
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # its figures on the eval set ({"reward": …, "pass@4": …}); null: the job has no eval set
    eval_metrics: Mapped[dict[str, float | None] | None] = mapped_column(JSONType)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index(None, "job_id", "id"),)

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    level: Mapped[str] = mapped_column(String(16))  # info, warning, error
    kind: Mapped[str] = mapped_column(String(32))  # status, log, checkpoint
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobSample(Base):
    """A few prompts, completions and rewards of a step: what the model actually writes."""

    __tablename__ = "job_samples"
    __table_args__ = (Index(None, "job_id", "step"),)

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Worker(Base):
    """A training worker that is up, as it last said (``worker.presence``): it renews
    ``heartbeat_at`` every ``heartbeat_interval_s``, and one not heard from for
    ``heartbeat_stale_s`` is gone. The API refuses a job asking for more devices than any live
    worker has (``jobs.submission.check_devices``)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # its Celery hostname
    devices: Mapped[int] = mapped_column(Integer)  # the most a job it takes may ask for
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
