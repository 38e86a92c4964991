"""The webhook deliverer: a thread in every worker's main process, started beside the sweeper
(``worker.sweeper.SweeperStep``), that makes the job webhook attempts that are due
(``jobs.webhooks``)."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from jobs.settings import Settings
from jobs.webhooks import deliver_due_webhooks

log = logging.getLogger(__name__)


class WebhookDeliverer(threading.Thread):
    """Every ``sweep_interval_s``, the webhook attempts that are due: retries, and first attempts
    that the process that ended the job did not make (it crashed, or its database blinked)."""

    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session]):
        super().__init__(name="grpo-webhooks", daemon=True)
        self.settings, self.sessions = settings, sessions
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.settings.sweep_interval_s):
            try:
                deliver_due_webhooks(sessions=self.sessions, settings=self.settings)
            except Exception:
                log.exception(
                    "webhook deliveries failed; trying again in %ss", self.settings.sweep_interval_s
                )

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
