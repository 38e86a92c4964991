"""Query functions both the API and the workers use: plain, keyword-only, verb-first.

They flush and never commit: the caller's unit of work (``jobs.db.unit_of_work``) owns the
transaction.
"""

from jobs.queries.checkpoints import (
    delete_checkpoint,
    forget_missing_checkpoints,
    get_checkpoint,
    list_checkpoints,
    record_evaluation,
    upsert_checkpoint,
)
from jobs.queries.datasets import create_dataset, delete_dataset, get_dataset, list_datasets
from jobs.queries.events import add_event, list_events, list_events_newest_first
from jobs.queries.idempotency import find_idempotent_resource, remember_idempotency_key
from jobs.queries.jobs import (
    count_active_jobs,
    create_job,
    get_job,
    get_job_with_metrics,
    list_jobs,
    request_cancel,
    request_pause,
    request_resume,
)
from jobs.queries.keys import create_api_key, get_api_key_by_hash, list_api_keys, revoke_api_key
from jobs.queries.lease import (
    claim_job,
    finish_job,
    get_job_gpus,
    is_stop_requested,
    jobs_due_for_send,
    mark_sent,
    record_given_up,
    record_step,
    renew_lease,
    requeue_stale_jobs,
    stop_job,
)
from jobs.queries.records import add_samples, append_metrics, list_metrics, list_samples
from jobs.queries.webhooks import (
    claim_webhook_attempt,
    list_due_webhooks,
    queue_webhook,
    record_webhook_attempt,
)
from jobs.queries.workers import forget_workers, largest_live_worker, record_worker

__all__ = [
    "add_event",
    "add_samples",
    "append_metrics",
    "claim_job",
    "count_active_jobs",
    "create_api_key",
    "create_dataset",
    "create_job",
    "delete_checkpoint",
    "delete_dataset",
    "find_idempotent_resource",
    "forget_workers",
    "finish_job",
    "forget_missing_checkpoints",
    "get_api_key_by_hash",
    "get_checkpoint",
    "get_dataset",
    "get_job",
    "get_job_gpus",
    "get_job_with_metrics",
    "is_stop_requested",
    "largest_live_worker",
    "list_api_keys",
    "remember_idempotency_key",
    "record_given_up",
    "renew_lease",
    "revoke_api_key",
    "jobs_due_for_send",
    "list_checkpoints",
    "list_datasets",
    "list_events",
    "list_events_newest_first",
    "list_jobs",
    "list_metrics",
    "list_samples",
    "mark_sent",
    "record_evaluation",
    "record_step",
    "request_cancel",
    "request_pause",
    "request_resume",
    "requeue_stale_jobs",
    "stop_job",
    "upsert_checkpoint",
    "claim_webhook_attempt",
    "list_due_webhooks",
    "queue_webhook",
    "record_webhook_attempt",
    "record_worker",
]
