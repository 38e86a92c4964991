"""The training workers that are up, as they say themselves (``worker.presence``): what the API
needs to know to refuse a job that no worker here can run."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from jobs.models import Worker, utcnow
from jobs.queries._util import upsert


def record_worker(*, session: Session, name: str, devices: int) -> None:
    """``name`` is up now with ``devices`` devices (a worker restarted with other devices replaces
    its row)."""
    stmt = upsert(session, Worker.__table__).values(name=name, devices=devices, heartbeat_at=utcnow())
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"], set_={k: stmt.excluded[k] for k in ("devices", "heartbeat_at")}
        )
    )


def forget_workers(*, session: Session, seen_before: datetime) -> int:
    """Drop the rows of workers not heard from since ``seen_before``; how many there were."""
    return session.execute(delete(Worker).where(Worker.heartbeat_at < seen_before)).rowcount


def largest_live_worker(*, session: Session, seen_after: datetime) -> int | None:
    """The most devices a worker heard from since ``seen_after`` has; None: no worker was."""
    return session.scalar(select(func.max(Worker.devices)).where(Worker.heartbeat_at >= seen_after))
