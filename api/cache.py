"""The polled routes' answers, kept until their job changes.

A client following a job polls ``GET /v1/jobs/{id}`` and ``GET /v1/jobs/{id}/metrics?after_step=``
every second or two, while the job changes once a step (seconds to minutes on a GPU) and at each
heartbeat: most polls would read the database for the answer they got last time. Each API process
keeps the rendered JSON of those answers, per job, and PostgreSQL says when a job changed:
triggers (migration 0005) send ``NOTIFY grpo_job_changed, '<job id>'`` with every committed write
to a job's row or metrics, whoever writes it, and a listener here drops that job's answers.

Fresh, not "fresh within a TTL":

* An answer read from the database is kept only if no change of its job was heard while it was
  being read (it might predate the change). Nothing is served while the listener is not
  connected, and its (re)connection drops everything kept, since it may have missed notifications.
* Polls arriving while an answer is being read join that read: after a step, the clients
  polling the job cost the database one query, not one each.
* A request in this process that writes a job (cancel, pause, resume) drops that job's answers
  before its own response goes out (``ForgetWrittenJobs``), so a client sees its own write at once.
  A write through another API process or a worker is seen once its notification arrives, which
  PostgreSQL sends as the write commits: milliseconds, as for a read from a replica.
* The listener pings its connection every 5 s; a connection that fails or stops answering stops
  the serving until a new one is listening. (One that dies without a word, its server's host
  gone, is found out by the next ping: answers may lag that long, ``ping_s + timeout_s``, once.)

SQLite (the embedded default) has no NOTIFY: there the cache is off and every poll reads the
database. ``GRPO_RESPONSE_CACHE_MB=0`` turns it off anywhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg
from cachetools import LRUCache
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import make_url
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

CHANNEL = "grpo_job_changed"  # migration 0005's triggers notify on it
MAX_VARIANTS = 16  # answers kept per job (owner x route x query); the oldest goes first
MAX_TRACKED = 100_000  # jobs whose last change's number is remembered

Variant = tuple[Any, ...]  # what identifies one answer about a job: (owner, route, *query)


class ResponseCache:
    """Rendered answers per job, in LRU order, up to ``max_bytes`` in all.

    Used from the event loop's thread only (the routes that read it are ``async``; the listener
    is a task on the same loop), hence no lock. ``serving`` is false until a listener is
    connected; while it is false nothing is served or kept.

    Changes are numbered as they are heard. A read of the database takes a ticket (the number of
    the last change) first, and its answer is kept only if its job has not changed since; the
    number of each job's last change is remembered for the newest ``MAX_TRACKED`` jobs changed,
    and for an older one the newest number forgotten stands in (erring towards "changed").
    """

    def __init__(self, max_bytes: int):
        self.answers: LRUCache[str, dict[Variant, bytes]] = LRUCache(
            maxsize=max(1, max_bytes), getsizeof=lambda variants: sum(map(len, variants.values())) or 1
        )
        self.changes = 0  # changes heard so far (a listener's (re)connection counts as every job's)
        self.changed_at: OrderedDict[str, int] = OrderedDict()  # job -> the number of its last change
        self.forgotten_at = 0  # the newest number dropped from changed_at, and of the last reset
        self.reads: dict[str, dict[Variant, asyncio.Future[bytes]]] = {}  # job -> the reads under way
        self.serving = False
        self.hits = self.misses = 0

    def get(self, job_id: str, variant: Variant) -> bytes | None:
        answer = self.answers.get(job_id, {}).get(variant) if self.serving else None
        if answer is None:
            self.misses += 1
        else:
            self.hits += 1
        return answer

    def ticket(self) -> int | None:
        """Taken before reading the database for an answer; ``put`` keeps the answer only if its
        job has not changed since (``None``: not serving, keep nothing)."""
        return self.changes if self.serving else None

    def put(self, ticket: int | None, job_id: str, variant: Variant, answer: bytes) -> None:
        if ticket is None or not self.serving or self.changed_at.get(job_id, self.forgotten_at) > ticket:
            return
        variants = dict(self.answers.get(job_id, {}))
        variants[variant] = answer
        while len(variants) > MAX_VARIANTS:
            del variants[next(iter(variants))]
        try:
            self.answers[job_id] = variants  # re-inserted, so that its size is counted again
        except ValueError:  # one job's answers larger than the whole cache: not kept
            self.answers.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        self.changes += 1
        self.changed_at[job_id] = self.changes
        self.changed_at.move_to_end(job_id)
        if len(self.changed_at) > MAX_TRACKED:
            self.forgotten_at = self.changed_at.popitem(last=False)[1]
        self.answers.pop(job_id, None)
        self.reads.pop(
            job_id, None
        )  # a request from now on reads anew; those waiting get the read they joined

    def forget_all(self) -> None:
        self.changes += 1
        self.forgotten_at = self.changes
        self.changed_at.clear()
        self.answers.clear()
        self.reads.clear()

    def set_serving(self, serving: bool) -> None:
        self.forget_all()
        self.serving = serving

    async def answer(self, job_id: str, variant: Variant, read: Callable[[], bytes]) -> Response:
        """The kept answer, or ``read()``'s (run in the thread pool: it reads the database), kept
        for the next poll. ``read`` raises for an answer that is an error; errors are not kept.

        Requests for an answer being read join that read: after a change, the clients polling a
        job cost one read of the database, not one each."""
        answer = self.get(job_id, variant)
        if answer is not None:
            return Response(answer, media_type="application/json")
        if not self.serving:
            return Response(await run_in_threadpool(read), media_type="application/json")
        reads = self.reads.setdefault(job_id, {})
        pending = reads.get(variant)
        if pending is None:
            pending = reads[variant] = asyncio.ensure_future(self._read(job_id, variant, read))
            pending.add_done_callback(partial(self._read_done, job_id, variant))
        return Response(await asyncio.shield(pending), media_type="application/json")

    async def _read(self, job_id: str, variant: Variant, read: Callable[[], bytes]) -> bytes:
        ticket = self.ticket()
        answer = await run_in_threadpool(read)
        self.put(ticket, job_id, variant, answer)
        return answer

    def _read_done(self, job_id: str, variant: Variant, done: asyncio.Future[bytes]) -> None:
        reads = self.reads.get(job_id, {})
        if reads.get(variant) is done:
            del reads[variant]
            if not reads:
                del self.reads[job_id]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone (a client that hung up)


class ChangeListener:
    """Listens on PostgreSQL's ``grpo_job_changed`` channel and tells ``cache`` which jobs
    changed; reconnects (every ``retry_s``) when the connection fails."""

    ping_s = 5.0  # a silent connection is checked this often...
    timeout_s = 5.0  # ...and given this long to answer, or to connect

    def __init__(self, database_url: str, cache: ResponseCache, retry_s: float = 2.0):
        url = make_url(database_url).set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        self.cache = cache
        self.retry_s = retry_s
        self.task: asyncio.Task[None] | None = None
        self.connection: psycopg.AsyncConnection[Any] | None = None
        self.failing = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="grpo-change-listener")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    async def run(self) -> None:
        while True:
            try:
                await self.listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # psycopg's errors, a ping timing out, the server going away
                if not self.failing:  # once per outage
                    logger.warning(
                        "response cache off: not hearing job changes (%s); polls read the database "
                        "until the listener is back (tried every %gs)",
                        exc,
                        self.retry_s,
                    )
                self.failing = True
            finally:
                self.cache.set_serving(False)
                await self.close()
            await asyncio.sleep(self.retry_s)

    async def listen(self) -> None:
        self.connection = await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, connect_timeout=max(1, round(self.timeout_s))
        )
        await self.connection.execute(f"LISTEN {CHANNEL}")
        self.cache.set_serving(True)  # every change from here on is heard
        if self.failing:
            logger.warning("response cache on again: hearing job changes")
            self.failing = False
        while True:
            async for notify in self.connection.notifies(timeout=self.ping_s):
                self.cache.forget(notify.payload)
            # Notifications arriving during the ping are kept by psycopg for the next notifies().
            await asyncio.wait_for(self.connection.execute("SELECT 1"), self.timeout_s)

    async def close(self) -> None:
        if self.connection is not None:
            try:
                await self.connection.close()
            except Exception:  # already broken
                pass
            self.connection = None


class ForgetWrittenJobs:
    """Pure ASGI middleware: a request that may write a job (any method but GET/HEAD, on a route
    with a ``job_id``) drops that job's kept answers as its response starts, after the route has
    committed, so that this process never answers the writer's next poll from before its write."""

    def __init__(self, app: ASGIApp, cache: ResponseCache):
        self.app = app
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return

        async def forget_then_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                job_id = scope.get("path_params", {}).get("job_id")
                if job_id is not None:
                    self.cache.forget(job_id)
            await send(message)

        await self.app(scope, receive, forget_then_send)
