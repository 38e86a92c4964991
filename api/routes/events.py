from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.sse import EventSourceResponse

from api.deps import MAX_EVENT_ID, CurrentKeyId, CurrentOwner, DatabaseDep, SettingsDep
from api.errors import responses
from api.streaming import EventStreams, HeldEventSourceResponse, event_stream
from jobs.queries import get_job, list_events
from jobs.schemas import EventOut, Page

router = APIRouter(prefix="/v1/jobs", tags=["events"])

SSE_RESPONSE = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {"type": "string"},
                "example": (
                    'id: 7\nevent: status\ndata: {"id": 7, "job_id": "job_…", "level": "info", '
                    '"kind": "status", "message": "running on celery@gpu-0/4242 (attempt 1)", '
                    '"data": {"status": "running"}, "created_at": "2025-01-01T12:00:03Z"}\n\n'
                ),
            }
        }
    }
}


@router.get(
    "/{job_id}/events", response_model=Page[EventOut], responses={**SSE_RESPONSE, **responses(404, 422)}
)
def get_events(
    db: DatabaseDep,
    settings: SettingsDep,
    owner: CurrentOwner,
    key_id: CurrentKeyId,
    request: Request,
    job_id: str,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="Only events after this id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    accept: Annotated[str, Header()] = "application/json",
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_EVENT_ID)] = None,
) -> Page[EventOut] | EventSourceResponse:
    """The job's log: state changes, checkpoints, warnings, errors. Ask for `text/event-stream`
    to follow it live (server-sent events, resumable with `Last-Event-ID`); the stream ends
    when the job has ended. An API key may have GRPO_MAX_EVENT_STREAMS_PER_KEY streams open at
    once on each API process; past that, a 429 `too_many_event_streams` with Retry-After."""
    if "text/event-stream" in accept:
        with db.transaction() as session:
            get_job(session=session, owner=owner, job_id=job_id)
        streams: EventStreams = request.app.state.event_streams
        slot = streams.open(key_id)
        start = last_event_id if last_event_id is not None else after
        return HeldEventSourceResponse(
            event_stream(request, db, owner, job_id, after=start, poll_s=settings.event_poll_interval_s),
            slot,
        )
    with db.transaction() as session:
        get_job(session=session, owner=owner, job_id=job_id)
        events, has_more = list_events(session=session, job_id=job_id, after=after, limit=limit)
        return Page(data=[EventOut.model_validate(e) for e in events], has_more=has_more)
