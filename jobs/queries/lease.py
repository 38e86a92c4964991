"""Who runs a job: claims, heartbeats, endings, and the sweeper's recovery queries.

Every state change is a conditional ``UPDATE`` whose ``WHERE`` names the state it expects, so
two workers (or a worker and the sweeper) racing for one job cannot both win.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from jobs.models import Job, JobEvent, JobStatus, utcnow
from jobs.queries.events import add_event
from jobs.queries.webhooks import queue_webhook
from jobs.text import storable_text


def _held_by(job_id: str, worker: str) -> ColumnElement[bool]:
    return and_(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.running)


def claim_job(*, session: Session, job_id: str, worker: str, devices: Sequence[str] = ("cpu",)) -> Job | None:
    """Take a queued job for ``worker``, whose ``devices`` are these, and give it the first as many
    of them as it asks for (``Job.devices``); None if it is not queued (taken, finished,
    cancelled) or asks for more devices than ``worker`` has (a message on a queue this worker
    should not consume)."""
    gpus = get_job_gpus(session=session, job_id=job_id)
    if gpus is None or gpus > len(devices):
        return None
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(
            status=JobStatus.running,
            worker=worker,
            devices=list(devices[:gpus]),
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
    ).rowcount
    if not claimed:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    add_event(
        session=session,
        job_id=job_id,
        kind="status",
        message=f"running on {worker} ({', '.join(job.devices or ())}; attempt {job.attempts})",
        data={"status": "running", "attempt": job.attempts, "worker": worker, "devices": job.devices},
    )
    return job


def renew_lease(*, session: Session, job_id: str, worker: str) -> bool:
    """Renew the lease; False if ``worker`` no longer holds the job (the sweeper took it back)."""
    now = utcnow()
    return bool(
        session.execute(
            update(Job).where(_held_by(job_id, worker)).values(heartbeat_at=now, updated_at=now)
        ).rowcount
    )


def record_step(*, session: Session, job_id: str, worker: str, step: int) -> bool:
    """Move the job's step forward (and renew the lease); False if ``worker`` lost the job."""
    now = utcnow()
    return bool(
        session.execute(
            update(Job).where(_held_by(job_id, worker)).values(step=step, heartbeat_at=now, updated_at=now)
        ).rowcount
    )


def is_stop_requested(*, session: Session, job_id: str) -> bool:
    """Whether the job was asked to stop at its next step boundary: cancelled or paused."""
    requested = session.execute(
        select(Job.cancel_requested, Job.pause_requested).where(Job.id == job_id)
    ).first()
    return requested is not None and any(requested)


def finish_job(
    *,
    session: Session,
    job_id: str,
    worker: str,
    status: JobStatus,
    reason: str | None = None,
    step: int | None = None,
) -> bool:
    """End a job its worker holds; False if the lease was lost meanwhile (then nothing changes)."""
    assert status.terminal
    now = utcnow()
    reason = None if reason is None else storable_text(reason)  # it may quote a grader's or a model's output
    values = {
        "status": status,
        "failure_reason": reason,
        "finished_at": now,
        "updated_at": now,
        "heartbeat_at": None,
        "pause_requested": False,
    }  # a pause asked during the last step is moot
    if step is not None:
        values["step"] = step
    if not session.execute(update(Job).where(_held_by(job_id, worker)).values(**values)).rowcount:
        return False
    message = status.value if reason is None else f"{status.value}: {reason}"
    add_event(
        session=session,
        job_id=job_id,
        kind="status",
        level="error" if status == JobStatus.failed else "info",
        message=message,
        data={"status": status.value},
    )
    queue_webhook(session=session, job_id=job_id)
    return True


def stop_job(*, session: Session, job_id: str, worker: str, step: int) -> JobStatus | None:
    """End a run that stopped at a step boundary because it was asked to: ``cancelled`` if a
    cancel was requested (it wins over a pause), else ``paused``, to be resumed from the
    checkpoint just written. None if ``worker`` lost the job meanwhile (then nothing changes)."""
    now = utcnow()
    ends = (
        (JobStatus.cancelled, Job.cancel_requested.is_(True), {"finished_at": now}),
        (JobStatus.paused, Job.cancel_requested.is_(False), {"worker": None}),
    )
    for status, asked, values in ends:
        stopped = session.execute(
            update(Job)
            .where(_held_by(job_id, worker), asked)
            .values(status=status, heartbeat_at=None, pause_requested=False, updated_at=now, **values)
        ).rowcount
        if stopped:
            message = "cancelled" if status == JobStatus.cancelled else f"paused after step {step}"
            add_event(
                session=session,
                job_id=job_id,
                kind="status",
                message=message,
                data={"status": status.value, "step": step},
            )
            if status.terminal:
                queue_webhook(session=session, job_id=job_id)
            return status
    return None


GIVEN_UP = "given_up"  # the key, in a log event's data, of why a worker gave its attempt up


def record_given_up(*, session: Session, job_id: str, worker: str, cause: str) -> bool:
    """Say on the job's record why its worker gave this attempt up (the artifact store out of
    reach, its processes giving up) while the lease still runs; the sweeper re-queues it once the
    heartbeat is stale, or fails it naming this cause (``requeue_stale_jobs``). False if ``worker``
    no longer holds the job (then nothing is written)."""
    if not session.execute(select(Job.id).where(_held_by(job_id, worker))).first():
        return False
    add_event(
        session=session,
        job_id=job_id,
        kind="log",
        level="warning",
        message=f"this attempt gave up: {cause}; the job is re-queued once its worker's heartbeat is "
        "stale, and resumes from its newest checkpoint",
        data={GIVEN_UP: storable_text(cause), "worker": worker},
    )
    return True


def last_given_up(session: Session, job_id: str, worker: str | None) -> str | None:
    """The cause ``record_given_up`` recorded for ``worker``'s attempt at the job, if it did."""
    rows = session.execute(
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "log")
        .order_by(JobEvent.id.desc())
        .limit(20)
    ).scalars()
    for data in rows:
        if isinstance(data, dict) and GIVEN_UP in data and data.get("worker") == worker:
            return data[GIVEN_UP]
    return None


def requeue_stale_jobs(*, session: Session, stale_before: datetime, max_attempts: int) -> list[str]:
    """Take back running jobs whose heartbeat is older than ``stale_before``.

    Each goes back to ``queued`` (to resume from its checkpoint), or ends ``cancelled`` or
    ``paused`` if that was asked for, or ``failed`` once it has lost ``max_attempts`` workers.
    Returns the ids re-queued, which the caller sends to the broker after committing.
    """
    stale = session.execute(
        select(Job.id, Job.attempts, Job.cancel_requested, Job.pause_requested, Job.worker).where(
            Job.status == JobStatus.running, Job.heartbeat_at < stale_before
        )
    ).all()
    requeued = []
    now = utcnow()
    for job_id, attempts, cancel_requested, pause_requested, worker in stale:
        if cancel_requested:
            status, message = JobStatus.cancelled, f"cancelled (its worker {worker} stopped responding)"
            values = {"status": status, "finished_at": now}
        elif pause_requested:  # resumes from its newest checkpoint, like a re-queued job
            status, message = JobStatus.paused, f"paused (its worker {worker} stopped responding)"
            values = {"status": status, "pause_requested": False}
        elif attempts >= max_attempts:
            cause = last_given_up(session, job_id, worker)
            reason = (
                f"the job's worker was lost {attempts} times (last: {worker}); it may be running out of "
                f"memory or crashing its process; see the worker logs"
                if cause is None
                else f"{attempts} attempts ended without finishing the job; the last gave up because {cause}"
            )
            status, message = JobStatus.failed, f"failed: {reason}"
            values = {"status": status, "failure_reason": reason, "finished_at": now}
        else:
            status, message = JobStatus.queued, f"re-queued: worker {worker} stopped sending heartbeats"
            values = {"status": status, "queued_at": now, "sent_at": None}
        taken = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.running,
                Job.worker == worker,
                Job.heartbeat_at < stale_before,
            )
            .values(worker=None, heartbeat_at=None, updated_at=now, **values)
        ).rowcount
        if taken:
            add_event(
                session=session,
                job_id=job_id,
                kind="status",
                message=message,
                level="warning" if status in (JobStatus.queued, JobStatus.failed) else "info",
                data={"status": status.value},
            )
            if status == JobStatus.queued:
                requeued.append(job_id)
            elif status.terminal:
                queue_webhook(session=session, job_id=job_id)
    return requeued


def jobs_due_for_send(
    *, session: Session, unsent_before: datetime, resent_before: datetime, max_gpus: int | None = None
) -> list[str]:
    """Queued jobs whose message may be missing: never sent (the send after commit failed) since
    ``unsent_before``, or last sent before ``resent_before`` (the broker may have lost it); with
    ``max_gpus``, only those asking for at most that many devices."""
    stmt = select(Job.id).where(
        Job.status == JobStatus.queued,
        or_(and_(Job.sent_at.is_(None), Job.queued_at < unsent_before), Job.sent_at < resent_before),
    )
    if max_gpus is not None:
        stmt = stmt.where(Job.gpus <= max_gpus)
    return list(session.scalars(stmt.order_by(Job.id)))


def get_job_gpus(*, session: Session, job_id: str) -> int | None:
    """The devices job ``job_id`` asks for (which queue its message goes to); None: no such job."""
    return session.scalar(select(Job.gpus).where(Job.id == job_id))


def mark_sent(*, session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(sent_at=utcnow()))
