"""The sweeper: takes back jobs whose worker died and re-sends jobs whose message went missing.
``SweeperStep`` starts it with the worker, and beside it, on threads of their own, the webhook
deliverer (``worker.webhooks``: a slow receiver never delays the recovery of jobs) and the
worker's presence (``worker.presence``: it is up, with so many devices).

It runs as a thread in every worker's main process, beside the pool, rather than under celery
beat: it needs no extra process, it keeps running while the pool process trains (a beat-sent
sweep task would wait behind the GPU job on a one-slot worker), and wherever jobs can run a
sweeper runs. Several sweepers are safe: each recovery is a conditional update, and a job sent
twice is harmless because only one claim can succeed.

A message goes missing when the send after commit fails, or when the broker loses it (Redis
restarted without persistence). The first is seen in the database (no ``sent_at``); the second
is seen by an idle worker: with prefetch 1, a worker that has had a free slot for
``send_grace_s`` while jobs are queued would be holding one of their messages, had the broker
kept it. So an idle worker re-sends every queued job that fits it (one asking for no more devices
than it has: the queues it consumes), and a busy one leaves them alone: the queues never fill
with copies while the workers are busy, a job no live worker can run is not re-sent every few
seconds, and a lost queue is refilled within seconds. (A resend after ``resend_after_s`` remains
as a backstop, for every size.) Every send routes by the job's row (``jobs.broker.job_sender``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from jobs.broker import Dispatcher, job_sender
from jobs.db import session_factory, unit_of_work
from jobs.models import since
from jobs.queries import jobs_due_for_send, requeue_stale_jobs
from jobs.settings import Settings, get_settings
from worker.devices import worker_devices
from worker.presence import Presence
from worker.webhooks import WebhookDeliverer

log = logging.getLogger(__name__)


def sweep(
    *, settings: Settings, dispatcher: Dispatcher, idle_for_s: float = 0.0, devices: int = 1
) -> list[str]:
    """One pass; returns the ids sent to the broker. ``idle_for_s``: how long this worker, which
    has ``devices`` devices, has had a slot free (held fewer messages than it can run)."""
    with unit_of_work(dispatcher.sessions) as session:
        requeued = requeue_stale_jobs(
            session=session,
            stale_before=since(settings.heartbeat_stale_s),
            max_attempts=settings.max_attempts,
        )
    idle = idle_for_s >= settings.send_grace_s
    with unit_of_work(dispatcher.sessions) as session:
        missing = jobs_due_for_send(
            session=session,
            unsent_before=since(settings.send_grace_s),
            resent_before=since(settings.resend_after_s),
        )
        if idle:
            missing += jobs_due_for_send(
                session=session,
                unsent_before=since(settings.send_grace_s),
                resent_before=since(settings.send_grace_s),
                max_gpus=devices,
            )
    sent = []
    for job_id in dict.fromkeys(requeued + missing):
        if dispatcher.deliver(job_id):
            sent.append(job_id)
    if sent:
        log.info(
            "sweeper sent %d job(s) to the broker%s: %s (re-queued after a lost worker: %s)",
            len(sent),
            f" (a slot of this worker free for {idle_for_s:.0f} s)" if idle else "",
            ", ".join(sent),
            ", ".join(requeued) or "none",
        )
    return sent


class Sweeper(threading.Thread):
    def __init__(
        self,
        *,
        settings: Settings,
        dispatcher: Dispatcher,
        devices: int,
        has_free_slot: Callable[[], bool] = lambda: False,
    ):
        super().__init__(name="grpo-sweeper", daemon=True)
        self.settings = settings
        self.dispatcher = dispatcher
        self.devices = devices
        self.has_free_slot = has_free_slot
        self.stopping = threading.Event()

    def run(self) -> None:
        busy_at = time.monotonic()
        while True:
            if not self.has_free_slot():
                busy_at = time.monotonic()
            try:
                if sweep(
                    settings=self.settings,
                    dispatcher=self.dispatcher,
                    idle_for_s=time.monotonic() - busy_at,
                    devices=self.devices,
                ):
                    busy_at = time.monotonic()  # give what was sent time to arrive
            except Exception:
                log.exception("sweep failed; trying again in %ss", self.settings.sweep_interval_s)
            if self.stopping.wait(self.settings.sweep_interval_s):
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def free_slot(concurrency: int) -> Callable[[], bool]:
    """Whether the worker holds fewer messages (prefetched or running) than it runs at once."""
    return lambda: len(worker_state.reserved_requests) < concurrency


class SweeperStep(bootsteps.StartStopStep):
    """Starts the sweeper, the webhook deliverer and the worker's presence with the worker (after
    the pool) and stops them on shutdown."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any):
        super().__init__(worker, **kwargs)
        self.threads: list[Sweeper | WebhookDeliverer | Presence] = []

    def start(self, worker: Any) -> None:
        settings = get_settings()
        sessions = session_factory(settings.database_url)
        dispatcher = Dispatcher(job_sender(worker.app, settings, sessions), sessions)
        devices = len(worker_devices(settings.worker_devices))
        self.threads = [
            Sweeper(
                settings=settings,
                dispatcher=dispatcher,
                devices=devices,
                has_free_slot=free_slot(worker.concurrency),
            ),
            WebhookDeliverer(settings=settings, sessions=sessions),
            Presence(settings=settings, sessions=sessions, name=worker.hostname, devices=devices),
        ]
        for thread in self.threads:
            thread.start()

    def stop(self, worker: Any) -> None:
        for thread in self.threads:
            thread.stop()
