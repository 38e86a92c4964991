"""A job's event log: what the trainer and the service said about it, in order. Read oldest
first after an id (the stream and the native API), or newest first before one (OpenAI-style
lists). Keyed by job id: the API reads it only after ``get_job(owner=...)`` found the job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import JobEvent
from jobs.queries._util import jsonable, page
from jobs.text import storable_text


def add_event(
    *,
    session: Session,
    job_id: str,
    kind: str,
    message: str,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(
        job_id=job_id, kind=kind, level=level, message=storable_text(message), data=jsonable(data)
    )
    session.add(event)
    session.flush()
    return event


def list_events(
    *, session: Session, job_id: str, after: int = 0, limit: int = 100
) -> tuple[list[JobEvent], bool]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id)
    return page(session, stmt, limit=limit)


def list_events_newest_first(
    *, session: Session, job_id: str, before: int | None = None, limit: int = 20
) -> tuple[list[JobEvent], bool]:
    """The job's events, newest first; ``before``: only those older than that event id."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
    if before is not None:
        stmt = stmt.where(JobEvent.id < before)
    return page(session, stmt, limit=limit)
