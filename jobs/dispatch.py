"""Handing jobs to the broker: only after their rows are committed, and recorded when done.

A send that fails leaves the job ``queued`` with no ``sent_at``; the worker's sweeper re-sends
it. The broker never holds a job the database does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from jobs.db import call_after_commit, unit_of_work
from jobs.queries import mark_sent

log = logging.getLogger(__name__)

Send = Callable[[str], None]


class Dispatcher:
    def __init__(self, send: Send, sessions: sessionmaker[Session]):
        self.send = send
        self.sessions = sessions

    def deliver(self, job_id: str) -> bool:
        """Send one job now; False (logged) if the broker refused it."""
        try:
            self.send(job_id)
        except Exception:
            log.warning("could not send job %s to the broker; the sweeper will re-send it", job_id, exc_info=True)
            return False
        with unit_of_work(self.sessions) as session:
            mark_sent(session=session, job_id=job_id)
        return True

    def deliver_after_commit(self, session: Session, job_id: str) -> None:
        call_after_commit(session, lambda: self.deliver(job_id))
