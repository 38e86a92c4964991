"""The FastAPI app: ``uvicorn api.main:app`` (settings from ``GRPO_*``), or ``create_app(settings)``."""

from __future__ import annotations

from functools import lru_cache

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api import errors
from api.observability import JobsByStatus, RequestMetrics
from api.routes import checkpoints, datasets, events, health, jobs
from jobs.db import Database
from jobs.dispatch import Dispatcher, Send
from jobs.settings import Settings, get_settings
from worker.broker import job_sender, make_celery

DESCRIPTION = """POST a GRPO job, watch its reward curve, download the fine-tuned checkpoint.

Errors always have the shape `{"error": {"code": ..., "message": ..., "param": ...}}`, where
`param` is the dotted path of the offending field (e.g. `reward[0].pattern`). Lists are
paginated with `after=<last id>&limit=` and answer `{"data": [...], "has_more": bool}`."""

TAGS = [
    {"name": "datasets", "description": "JSONL prompts (and the fields rewards read), uploaded once."},
    {"name": "jobs", "description": "Create, follow and cancel GRPO jobs; per-step metrics."},
    {"name": "events", "description": "A job's log, also as server-sent events."},
    {"name": "checkpoints", "description": "Hugging Face checkpoints, streamed as tar archives."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]


def create_app(settings: Settings | None = None, *, send: Send | None = None) -> FastAPI:
    """``send`` replaces the broker (tests that only look at HTTP); it defaults to Celery."""
    settings = settings or get_settings()
    app = FastAPI(title="GRPO fine-tuning service", version="0.1.0", description=DESCRIPTION, openapi_tags=TAGS)
    app.state.settings = settings
    app.state.database = Database(settings.database_url)
    app.state.celery = make_celery(settings)
    app.state.dispatcher = Dispatcher(send or job_sender(app.state.celery, settings), app.state.database.sessions)
    app.state.registry = CollectorRegistry()
    app.state.registry.register(JobsByStatus(app.state.database))
    app.add_middleware(RequestMetrics, registry=app.state.registry)
    errors.install(app)
    for module in (datasets, jobs, events, checkpoints, health):
        app.include_router(module.router)
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
