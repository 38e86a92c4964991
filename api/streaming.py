"""Long responses: a checkpoint as a tar stream, a job's events as server-sent events."""

from __future__ import annotations

import asyncio
import tarfile
import time
from collections.abc import AsyncIterator, Iterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.auth import bearer_token, still_live
from jobs.artifacts import ArtifactFile
from jobs.db import Database
from jobs.models import JobEvent, JobStatus
from jobs.queries import get_job, list_events
from jobs.schemas import EventOut

BLOCK = tarfile.BLOCKSIZE
KEEPALIVE_S = 15.0


def tar_stream(files: list[ArtifactFile], root: str) -> Iterator[bytes]:
    """An uncompressed tar of ``files`` under ``root/``, one chunk at a time as each file's bytes
    arrive (from this machine's disk or the object store): weights do not compress, and a stream
    needs no temporary copy of a multi-gigabyte checkpoint."""
    for file in files:
        info = tarfile.TarInfo(f"{root}/{file.name}")
        info.size, info.mtime, info.mode = file.size, int(file.mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        remaining = file.size
        for chunk in file.chunks():
            if len(chunk) > remaining:
                raise OSError(f"{file.name} grew while it was being sent")
            remaining -= len(chunk)
            yield chunk
        if remaining:
            raise OSError(f"{file.name} shrank while it was being sent")
        if file.size % BLOCK:
            yield bytes(BLOCK - file.size % BLOCK)
    yield bytes(2 * BLOCK)


def sse_message(event: JobEvent) -> str:
    data = EventOut.model_validate(event).model_dump_json()
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


def _read_events(db: Database, owner: str, job_id: str, after: int) -> tuple[list[JobEvent], bool]:
    """New events, and whether the stream is complete (the job ended and all is sent)."""
    with db.transaction() as session:
        job = get_job(session=session, owner=owner, job_id=job_id)
        ended = JobStatus(job.status).terminal  # read before the events
        events, has_more = list_events(session=session, job_id=job_id, after=after, limit=500)
    return events, ended and not has_more


async def event_stream(
    request: Request, db: Database, owner: str, job_id: str, *, after: int, poll_s: float
) -> AsyncIterator[str]:
    """Events after ``after`` as they are recorded; ends once the job has ended, or once the
    request's API key is revoked (a paused job's stream would otherwise run on for good)."""
    yield f"retry: {int(poll_s * 2000)}\n\n"
    quiet_since = time.monotonic()
    token = bearer_token(request.headers.get("authorization"))
    while await still_live(request.app.state, token):
        events, complete = await run_in_threadpool(_read_events, db, owner, job_id, after)
        for event in events:
            yield sse_message(event)
            after = event.id
        if complete or await request.is_disconnected():
            return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            yield ": keep-alive\n\n"  # proxies close connections that stay silent
            quiet_since = time.monotonic()
        await asyncio.sleep(poll_s)
