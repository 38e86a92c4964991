"""Long responses: a checkpoint as a tar stream, a job's events as server-sent events."""

from __future__ import annotations

import asyncio
import tarfile
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse
from starlette.types import Receive, Scope, Send

from api.auth import bearer_token, still_live
from jobs.artifacts import ArtifactFile
from jobs.db import Database
from jobs.errors import TooManyEventStreams
from jobs.models import JobEvent, JobStatus
from jobs.queries import get_job, list_events
from jobs.schemas import EventOut

BLOCK = tarfile.BLOCKSIZE
KEEPALIVE_S = 15.0
# A 429's hint: a stream ends whenever its client leaves or its job does, which nobody can foretell.
STREAMS_RETRY_AFTER_S = 5.0


def tar_header(file: ArtifactFile, root: str) -> bytes:
    """The tar header of ``file`` under ``root/`` (PAX: a long name takes a header of its own)."""
    info = tarfile.TarInfo(f"{root}/{file.name}")
    info.size, info.mtime, info.mode = file.size, int(file.mtime), 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def tar_size(files: list[ArtifactFile], root: str) -> int:
    """How many bytes ``tar_stream(files, root)`` yields (a download's Content-Length), from the
    files' sizes alone: each header, its bytes padded to a block, and the two closing blocks."""
    return sum(len(tar_header(f, root)) + -(-f.size // BLOCK) * BLOCK for f in files) + 2 * BLOCK


def tar_stream(files: list[ArtifactFile], root: str) -> Iterator[bytes]:
    """An uncompressed tar of ``files`` under ``root/``, one chunk at a time as each file's bytes
    arrive (from this machine's disk or the object store): weights do not compress, and a stream
    needs no temporary copy of a multi-gigabyte checkpoint. A file that grows or shrinks meanwhile
    fails the stream (an ``OSError``), so it never carries other than ``tar_size`` bytes."""
    for file in files:
        yield tar_header(file, root)
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


class EventStreams:
    """The event streams open in this API process, counted per API key: ``open`` takes one of a
    key's ``per_key`` slots or raises ``TooManyEventStreams`` (a 429). Kept in the process, as
    reward dry-runs' slots are, not in Redis as the rate limit is: a token bucket refills by
    itself, but a count of open streams must be given back, and a killed process could not give
    back a shared count; its own dies with it.

    Slots are taken in the route's thread and given back on the event loop, or by the garbage
    collector in whatever thread it runs (``StreamSlot``), even one holding the lock: so a slot
    given back is only queued (``deque.append`` needs no lock), and counted off under the lock by
    the next ``open`` or ``held``."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self.counts: dict[str, int] = {}
        self.closed: deque[str] = deque()  # keys whose streams ended, not yet counted off
        self.lock = threading.Lock()

    def open(self, key_id: str) -> StreamSlot:
        with self.lock:
            self._count_closed()
            held = self.counts.get(key_id, 0)
            if held >= self.per_key:
                raise TooManyEventStreams(held, self.per_key, STREAMS_RETRY_AFTER_S)
            self.counts[key_id] = held + 1
        return StreamSlot(self, key_id)

    def held(self, key_id: str) -> int:
        with self.lock:
            self._count_closed()
            return self.counts.get(key_id, 0)

    def _close(self, key_id: str) -> None:
        self.closed.append(key_id)

    def _count_closed(self) -> None:
        while self.closed:
            key_id = self.closed.popleft()
            held = self.counts.pop(key_id) - 1
            if held:
                self.counts[key_id] = held


class StreamSlot:
    """One open stream of a key. ``release()`` gives the slot back, once however often it is
    called, and the slot gives itself back if it is dropped unreleased (a response never sent)."""

    def __init__(self, streams: EventStreams, key_id: str):
        self.release = weakref.finalize(self, streams._close, key_id)


class HeldEventSourceResponse(EventSourceResponse):
    """Server-sent events holding their key's ``slot`` for as long as they are sent: released
    however the stream ends (the job ended, the key was revoked, the client left, an error, the
    server shutting down and cancelling it)."""

    def __init__(self, content: AsyncIterator[str], slot: StreamSlot):
        super().__init__(content)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
