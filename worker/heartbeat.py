"""The lease of a running job: a thread renews it until the job ends."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from sqlalchemy.orm import Session, sessionmaker

from jobs.db import unit_of_work
from jobs.queries import renew_lease

log = logging.getLogger(__name__)


class Heartbeat:
    """``with Heartbeat(...):`` renews the job's heartbeat every ``interval`` seconds.

    A separate thread, so a long step (or a slow checkpoint) does not look like a dead worker.
    If the renewal finds the lease gone, ``on_lost`` is called once and the thread ends.
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        job_id: str,
        worker: str,
        interval: float,
        on_lost: Callable[[], None],
    ):
        self.sessions, self.job_id, self.worker, self.interval = sessions, job_id, worker, interval
        self.on_lost = on_lost
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                with unit_of_work(self.sessions) as session:
                    held = renew_lease(session=session, job_id=self.job_id, worker=self.worker)
            except Exception as exc:  # the database is unreachable, say: the next beat tries again
                log.warning(
                    "heartbeat for job %s failed (%s); retrying",
                    self.job_id,
                    " ".join(str(exc).split())[:200],
                )
                continue
            if not held:
                log.warning("job %s: lease lost (the sweeper re-queued it); stopping", self.job_id)
                self.on_lost()
                return
