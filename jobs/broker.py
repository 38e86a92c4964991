"""Enqueueing, in one place: the broker's Celery configuration, the task names, the sender that
hands a job to the broker only after its row is committed, and the readiness check.

The API sends ``run_job`` and chat completion messages by name: it never imports the tasks or the
trainer. ``worker.app`` runs an app made by the same ``make_celery``, so both sides agree on the
broker, the routes and the result backend.

A send that fails leaves the job ``queued`` with no ``sent_at``; the worker's sweeper re-sends
it. The broker never holds a job the database does not.

Jobs are routed by the devices they ask for (their ``gpus``): one queue per size
(``train_queue``), and a worker with D devices consumes the queues of sizes 1 to D
(``train_queues``), so it takes only jobs that fit it, and a job waits for a worker big enough
rather than for a particular one. Celery's own routing, no scheduler of ours: the sender reads the
size from the job's row, so a re-send by the sweeper goes where the first send went.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from jobs.chat import CHAT_COMPLETION
from jobs.chat_queue import result_backend_config
from jobs.db import call_after_commit, unit_of_work
from jobs.queries import get_job_gpus, mark_sent
from jobs.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB = "grpo.run_job"

Send = Callable[[str], None]


def transport_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_url.startswith("filesystem"):
        assert settings.broker_dir is not None
        folders = {
            "data_folder_in": settings.broker_dir / "queue",
            "data_folder_out": settings.broker_dir / "queue",
            "control_folder": settings.broker_dir / "control",
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {key: str(folder) for key, folder in folders.items()}
    options: dict[str, Any] = {
        # Redis hands an unacknowledged message to another worker after this long. Jobs run for
        # hours, so it is long; recovery does not wait for it: the sweeper re-sends a job whose
        # lease went stale, and a redelivered message for a job someone holds is a no-op.
        "visibility_timeout": settings.visibility_timeout_s,
    }
    if settings.broker_key_prefix:
        options["global_keyprefix"] = settings.broker_key_prefix
    return options


def make_celery(settings: Settings) -> Celery:
    app = Celery("grpo", broker=settings.broker_url, include=["worker.tasks", "worker.inference"])
    app.conf.update(
        broker_transport_options=transport_options(settings),
        task_default_queue=settings.queue,
        # GPU work has its own queue and workers; chat completions theirs, so neither waits for the other
        task_routes={
            RUN_JOB: {"queue": settings.queue},
            CHAT_COMPLETION: {"queue": settings.inference_queue},
        },
        task_acks_late=True,  # acknowledge when the job ends, so a dead worker's message is not lost
        task_reject_on_worker_lost=True,  # a killed pool process requeues its message, never acks it
        worker_prefetch_multiplier=1,  # reserve one message at a time: queued jobs stay free for idle workers
        worker_concurrency=1,  # one job per worker, on as many of its devices as the job asks for
        worker_max_tasks_per_child=1,  # a fresh pool process per job hands all GPU memory back
        task_time_limit=None,  # jobs run for hours; they are stopped through the record (cancel)
        task_soft_time_limit=None,
        task_ignore_result=True,  # the job record is the result; only chat completions store one
        **result_backend_config(settings),  # where chat answers come back (worker.inference)
        worker_cancel_long_running_tasks_on_connection_loss=False,  # a broker blip must not kill a job
        broker_connection_retry_on_startup=True,  # a worker may start before the broker is up
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def train_queue(settings: Settings, gpus: int) -> str:
    """The queue of jobs asking for ``gpus`` devices: ``GRPO_QUEUE`` itself for one (the queue
    every worker has always consumed), ``<GRPO_QUEUE>.gpus-N`` for N."""
    return settings.queue if gpus == 1 else f"{settings.queue}.gpus-{gpus}"


def train_queues(settings: Settings, devices: int) -> list[str]:
    """The queues a training worker with ``devices`` devices consumes: every size it can run,
    largest first."""
    return [train_queue(settings, gpus) for gpus in range(devices, 0, -1)]


def job_sender(app: Celery, settings: Settings, sessions: sessionmaker[Session]) -> Send:
    """Sends a committed job to the queue of its size, read from its row."""

    def send(job_id: str) -> None:
        with unit_of_work(sessions) as session:
            gpus = get_job_gpus(session=session, job_id=job_id)
        if gpus is None:  # no such job: there is nothing to run
            log.warning("job %s is not in the database; not sending it", job_id)
            return
        app.send_task(RUN_JOB, args=[job_id], queue=train_queue(settings, gpus))

    return send


def broker_reachable(app: Celery, timeout: float = 2.0) -> bool:
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:
        return False


class Dispatcher:
    """Sends committed jobs to the broker and records that it did (``sent_at``)."""

    def __init__(self, send: Send, sessions: sessionmaker[Session]):
        self.send = send
        self.sessions = sessions

    def deliver(self, job_id: str) -> bool:
        """Send one job now; False (logged) if the broker refused it."""
        try:
            self.send(job_id)
        except Exception:
            log.warning(
                "could not send job %s to the broker; the sweeper will re-send it", job_id, exc_info=True
            )
            return False
        with unit_of_work(self.sessions) as session:
            mark_sent(session=session, job_id=job_id)
        return True

    def deliver_after_commit(self, session: Session, job_id: str) -> None:
        call_after_commit(session, lambda: self.deliver(job_id))
