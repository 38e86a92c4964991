"""Query functions both the API and the workers use: plain, keyword-only, verb-first.

They flush and never commit: the caller's unit of work (``jobs.db.unit_of_work``) owns the
transaction.
"""

from jobs.queries.datasets import create_dataset, get_dataset, list_datasets
from jobs.queries.jobs import (
    create_job,
    get_job,
    get_job_by_idempotency_key,
    get_job_with_metrics,
    list_jobs,
    request_cancel,
)
from jobs.queries.lease import (
    claim_job,
    finish_job,
    heartbeat,
    is_cancel_requested,
    jobs_due_for_send,
    mark_sent,
    record_step,
    requeue_stale_jobs,
)
from jobs.queries.records import (
    add_event,
    add_samples,
    append_metrics,
    get_checkpoint,
    list_checkpoints,
    list_events,
    list_metrics,
    prune_checkpoints,
    upsert_checkpoint,
)

__all__ = [
    "add_event", "add_samples", "append_metrics", "claim_job", "create_dataset", "create_job", "finish_job",
    "get_checkpoint", "get_dataset", "get_job", "get_job_by_idempotency_key", "get_job_with_metrics", "heartbeat", "is_cancel_requested",
    "jobs_due_for_send", "list_checkpoints", "list_datasets", "list_events", "list_jobs",
    "list_metrics", "mark_sent", "prune_checkpoints", "record_step", "request_cancel", "requeue_stale_jobs",
    "upsert_checkpoint",
]
