"""The FastAPI app: ``uvicorn api.main:app`` (settings from ``GRPO_*``), or ``create_app(settings)``."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache

import anyio.to_thread
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api import errors, openapi
from api.auth import AuthenticateFirst
from api.cache import ChangeListener, ForgetWrittenJobs, ResponseCache
from api.keycache import KeyCache
from api.limits import BodyLimit
from api.observability import JobsByStatus, RequestMetrics
from api.params import RefuseUnstorableParams
from api.ratelimit import make_rate_limiter
from api.routes import (
    chat,
    checkpoints,
    dashboard,
    datasets,
    events,
    files,
    fine_tuning,
    health,
    jobs,
    rewards,
    samples,
)
from api.streaming import EventStreams
from jobs.broker import Dispatcher, Send, job_sender, make_celery
from jobs.datasets import remove_leftover_uploads
from jobs.db import Database
from jobs.settings import Settings, get_settings

DESCRIPTION = """POST a GRPO job, watch its reward curve, download the fine-tuned checkpoint.

Every `/v1` request carries an API key, `Authorization: Bearer grpo_…` (`grpo keys create NAME`
makes one); a key reaches its owner's datasets and jobs only, and another owner's resource is a
404 like a missing one. Errors always have the shape `{"error": {"code": ..., "message": ...,
"param": ...}}`, where `param` is the dotted path of the offending field (e.g.
`reward[0].pattern`). Lists are paginated with `after=<last id>&limit=` and answer
`{"data": [...], "has_more": bool}`."""

# How long the server keeps an idle connection open. Longer than clients and load balancers keep
# theirs (httpx: 5 s, uvicorn's default too; load balancers: 60 s), so that the client always
# closes first: a server closing a connection at the moment a client reuses it makes that
# request fail with no answer.
KEEP_ALIVE_S = 75

TAGS = [
    {"name": "datasets", "description": "JSONL prompts (and the fields rewards read), uploaded once."},
    {"name": "jobs", "description": "Create, follow and cancel GRPO jobs; per-step metrics."},
    {"name": "events", "description": "A job's log, also as server-sent events."},
    {"name": "checkpoints", "description": "Hugging Face checkpoints, streamed as tar archives."},
    {"name": "samples", "description": "What the model writes: a few completions per step, with rewards."},
    {"name": "rewards", "description": "Try a reward spec on completions before a job runs."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
    {
        "name": "openai",
        "description": "OpenAI-compatible files, reinforcement fine-tuning jobs and chat completions "
        "from their checkpoints, for the `openai` SDK.",
    },
]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Routes run their database work in the thread pool: as many threads as pooled connections,
    # so that a thread never waits for a connection, nor opens and closes one per request.
    anyio.to_thread.current_default_thread_limiter().total_tokens = app.state.database.pool_size
    listener: ChangeListener | None = app.state.change_listener
    if listener is not None:
        listener.start()
    # What the app has built so far lives as long as the process: out of the collector's sight,
    # a full collection (every few thousand requests) no longer walks it, a pause of ~50 ms that
    # was most of the 99th percentile latency. Once per process (the tests start many apps).
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
    remove_leftover_uploads(app.state.settings.datasets_dir)  # what an API process killed mid-upload left
    yield
    if listener is not None:
        await listener.stop()
    close = getattr(app.state.rate_limiter, "close", None)  # the Redis limiter's connections
    if close is not None:
        await close()


def create_app(settings: Settings | None = None, *, send: Send | None = None) -> FastAPI:
    """``send`` replaces the broker (tests that only look at HTTP); it defaults to Celery."""
    settings = settings or get_settings()
    app = FastAPI(
        title="GRPO fine-tuning service",
        version="0.1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.database = Database(settings.database_url, pool_size=settings.database_pool_size)
    app.state.key_cache = KeyCache(settings.api_key_cache_s)
    app.state.celery = make_celery(settings)
    app.state.dispatcher = Dispatcher(
        send or job_sender(app.state.celery, settings, app.state.database.sessions),
        app.state.database.sessions,
    )
    app.state.registry = CollectorRegistry()
    app.state.registry.register(JobsByStatus(app.state.database))
    app.state.rate_limiter = make_rate_limiter(settings)  # shared through Redis when the broker is Redis
    app.state.event_streams = EventStreams(settings.max_event_streams_per_key)  # this process's SSE
    app.state.response_cache = ResponseCache(int(settings.response_cache_mb * 2**20))
    app.state.change_listener = (  # SQLite cannot notify: there the cache never serves
        ChangeListener(settings.database_url, app.state.response_cache)
        if settings.response_cache_mb > 0 and settings.database_url.startswith("postgresql")
        else None
    )
    app.add_middleware(ForgetWrittenJobs, cache=app.state.response_cache)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(
        RefuseUnstorableParams
    )  # a NUL in an id or a query parameter: a 4xx, not the database's 500
    app.add_middleware(AuthenticateFirst)  # 401/429 before the body is read or even its size looked at
    app.add_middleware(RequestMetrics, registry=app.state.registry)  # outermost: it counts the 413s too
    errors.install(app)
    openapi.install(app)
    for module in (jobs, datasets, events, checkpoints, samples, rewards, files, fine_tuning, chat):
        # every /v1 route needs a live key: AuthenticateFirst sees to it (OpenAPI says so: api/openapi.py)
        app.include_router(module.router, responses=errors.responses(401, 429))
    app.include_router(health.router)  # open: liveness, readiness, Prometheus
    app.include_router(dashboard.router)  # open: a static page; its requests carry the key
    app.mount("/static", dashboard.static_files, name="static")
    return app


@lru_cache
def default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn api.main:app`` builds the app on first access, so importing this module (as the
    # tests do, for create_app) reads no environment and touches no files.
    if name == "app":
        return default_app()
    raise AttributeError(name)
