from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from jobs.broker import broker_reachable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


def _database_reachable(request: Request) -> bool:
    try:
        with request.app.state.database.transaction() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


@router.get("/readyz", responses={503: {"description": "The database or the broker is unreachable."}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database and the broker both answer."""
    checks = {
        "database": await run_in_threadpool(_database_reachable, request),
        "broker": await run_in_threadpool(broker_reachable, request.app.state.celery),
    }
    ready = all(checks.values())
    body = {
        "status": "ok" if ready else "unavailable",
        "checks": {k: "ok" if v else "unreachable" for k, v in checks.items()},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
