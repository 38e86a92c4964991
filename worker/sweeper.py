"""The sweeper: takes back jobs whose worker died and re-sends jobs whose message went missing.

It runs as a thread in every worker's main process, beside the pool, rather than under celery
beat: it needs no extra process, it keeps running while the pool process trains (a beat-sent
sweep task would wait behind the GPU job on a one-slot worker), and wherever jobs can run a
sweeper runs. Several sweepers are safe: each recovery is a conditional update, and a job sent
twice is harmless because only one claim can succeed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

from jobs.db import session_factory, unit_of_work
from jobs.dispatch import Dispatcher
from jobs.models import since
from jobs.queries import jobs_due_for_send, requeue_stale_jobs
from jobs.settings import Settings, get_settings
from worker.broker import job_sender

log = logging.getLogger(__name__)


def sweep(*, settings: Settings, dispatcher: Dispatcher) -> list[str]:
    """One pass; returns the ids sent to the broker."""
    with unit_of_work(dispatcher.sessions) as session:
        requeued = requeue_stale_jobs(session=session, stale_before=since(settings.heartbeat_stale_s),
                                      max_attempts=settings.max_attempts)
    with unit_of_work(dispatcher.sessions) as session:
        missing = jobs_due_for_send(session=session, unsent_before=since(settings.send_grace_s),
                                    resent_before=since(settings.resend_after_s))
    sent = []
    for job_id in dict.fromkeys(requeued + missing):
        if dispatcher.deliver(job_id):
            sent.append(job_id)
    if sent:
        log.info("sweeper sent %d job(s) to the broker: %s (re-queued after a lost worker: %s)",
                 len(sent), ", ".join(sent), ", ".join(requeued) or "none")
    return sent


class Sweeper(threading.Thread):
    def __init__(self, *, settings: Settings, dispatcher: Dispatcher):
        super().__init__(name="grpo-sweeper", daemon=True)
        self.settings = settings
        self.dispatcher = dispatcher
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                sweep(settings=self.settings, dispatcher=self.dispatcher)
            except Exception:
                log.exception("sweep failed; trying again in %ss", self.settings.sweep_interval_s)
            if self.stopping.wait(self.settings.sweep_interval_s):
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


class SweeperStep(bootsteps.StartStopStep):
    """Starts the sweeper with the worker (after the pool) and stops it on shutdown."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any):
        super().__init__(worker, **kwargs)
        self.sweeper: Sweeper | None = None

    def start(self, worker: Any) -> None:
        settings = get_settings()
        dispatcher = Dispatcher(job_sender(worker.app, settings), session_factory(settings.database_url))
        self.sweeper = Sweeper(settings=settings, dispatcher=dispatcher)
        self.sweeper.start()

    def stop(self, worker: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
