"""A job's log newest first, as OpenAI-style lists page it (``after`` an id: the older ones)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import JobEvent
from jobs.queries._util import page


def list_events_newest_first(
    *, session: Session, job_id: str, before: int | None = None, limit: int = 20
) -> tuple[list[JobEvent], bool]:
    """The job's events, newest first; ``before``: only those older than that event id."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
    if before is not None:
        stmt = stmt.where(JobEvent.id < before)
    return page(session, stmt, limit=limit)
