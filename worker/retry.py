"""Database work that outlasts a short outage: a worker retries instead of losing the job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import unit_of_work

log = logging.getLogger(__name__)
T = TypeVar("T")

# What an unreachable database raises: a refused, reset or closed connection, a timeout.
DATABASE_UNREACHABLE = (OperationalError, InterfaceError)
FIRST_DELAY_S, MAX_DELAY_S = 0.2, 5.0


def with_retries(
    sessions: sessionmaker[Session], work: Callable[[Session], T], *, within_s: float, what: str
) -> T:
    """``work(session)`` in a unit of work, tried again with exponential backoff while the
    database is unreachable, for at most ``within_s`` seconds; then the last error is raised.

    ``work`` must be safe to repeat: a commit whose answer was lost may have landed (every
    write a worker makes is an upsert or a conditional update, or an event, which may repeat).
    """
    deadline = time.monotonic() + within_s
    delay = FIRST_DELAY_S
    while True:
        try:
            with unit_of_work(sessions) as session:
                return work(session)
        except DATABASE_UNREACHABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "%s: database unreachable (%s); retrying in %.1f s",
                what,
                " ".join(str(exc).split())[:200],
                delay,
            )
            time.sleep(delay)
            delay = min(2 * delay, MAX_DELAY_S)
