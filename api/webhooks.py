"""The first attempt at a job's webhook, made by the API process that ended the job (a cancel),
once the answer is sent; the workers' deliverers (``worker.webhooks``) make the retries."""

from __future__ import annotations

from fastapi import BackgroundTasks

from jobs.db import Database
from jobs.models import Job, WebhookStatus
from jobs.settings import Settings
from jobs.webhooks import first_attempt


def send_webhook_after_response(
    background: BackgroundTasks, job: Job, db: Database, settings: Settings
) -> None:
    """A job this request ended (committed by now) has its webhook due: the first attempt runs
    once the answer is sent; retries are the workers' deliverers'."""
    if job.webhook_status == WebhookStatus.pending:
        background.add_task(first_attempt, job.id, sessions=db.sessions, settings=settings)
