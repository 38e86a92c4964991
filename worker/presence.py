"""A training worker tells the service it is up and how many devices it has: a thread in its main
process (started with the sweeper, ``worker.sweeper.SweeperStep``) renews its row in ``workers``
every ``heartbeat_interval_s``, the interval of a job's lease. The API reads the largest live
size to refuse a job no worker can run (``jobs.submission.check_devices``).

A worker that stops leaves its row to go stale like a crashed one's, ``heartbeat_stale_s``
later: a restart (a deploy, new settings) then never looks like a service without that size.
Inference workers run no training job and do not register."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from jobs.db import unit_of_work
from jobs.models import since
from jobs.queries import forget_workers, record_worker
from jobs.settings import Settings

log = logging.getLogger(__name__)

FORGET_AFTER_S = 24 * 3600  # rows of workers gone this long are deleted (hostnames come and go)


class Presence(threading.Thread):
    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session], name: str, devices: int):
        super().__init__(name="grpo-presence", daemon=True)
        self.settings, self.sessions, self.worker, self.devices = settings, sessions, name, devices
        self.stopping = threading.Event()

    def run(self) -> None:
        forgotten = False
        while True:
            try:
                with unit_of_work(self.sessions) as session:
                    record_worker(session=session, name=self.worker, devices=self.devices)
                    if not forgotten:
                        forget_workers(session=session, seen_before=since(FORGET_AFTER_S))
                        forgotten = True
            except Exception as exc:  # the database is unreachable, say: the next beat tries again
                log.warning(
                    "could not record worker %s as up (%s); retrying",
                    self.worker,
                    " ".join(str(exc).split())[:200],
                )
            if self.stopping.wait(self.settings.heartbeat_interval_s):
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
