"""Celery tasks: thin wrappers that take ids and call plain functions."""

from __future__ import annotations

import os

from celery import Task, shared_task

from jobs.broker import RUN_JOB
from jobs.settings import get_settings
from worker.runner import claim_and_run


@shared_task(name=RUN_JOB, bind=True)
def run_job(self: Task, job_id: str) -> None:
    """Run job ``job_id`` if it is still queued; the record, not the message, says what to do."""
    claim_and_run(job_id, settings=get_settings(), worker=f"{self.request.hostname}/{os.getpid()}")
