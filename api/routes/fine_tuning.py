"""``/v1/fine_tuning/jobs``, as OpenAI's: reinforcement fine-tuning jobs, run as GRPO jobs.

The translation (graders → rewards, hyperparameters, objects) is ``api.openai``; each
route here is the native one's unit of work with OpenAI's shapes around it.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request

from api.content_type import accepts
from api.deps import (
    After,
    CurrentOwner,
    DatabaseDep,
    DispatcherDep,
    IdempotencyKey,
    SettingsDep,
)
from api.errors import OpenAIRoute, responses
from api.openai.objects import checkpoint_object, checkpoint_step, event_object, job_object
from api.openai.schemas import (
    FineTuningCheckpointOut,
    FineTuningJobCreate,
    FineTuningJobEventOut,
    FineTuningJobOut,
    ListOut,
)
from api.openai.translate import translate_job
from api.routes.checkpoints import download_url
from api.webhooks import send_webhook_after_response
from jobs.errors import InvalidRequest, ServiceError
from jobs.models import utcnow
from jobs.queries import (
    get_dataset,
    get_job,
    get_job_with_metrics,
    list_checkpoints,
    list_events_newest_first,
    list_jobs,
    list_metrics,
    request_cancel,
    request_pause,
    request_resume,
)
from jobs.submission import submit_job

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"], route_class=OpenAIRoute)

METADATA_FILTER = re.compile(r"^metadata\[(.+)\]$")
PageSize = Annotated[int, Query(ge=1, le=100, description="Page size.")]


@router.post(
    "",
    response_model=FineTuningJobOut,
    responses=responses(400, 404, 409, 413, 415, 429),
    dependencies=[accepts("application/json")],
)
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    db: DatabaseDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    owner: CurrentOwner,
    idempotency_key: IdempotencyKey = None,
) -> FineTuningJobOut:
    """A reinforcement fine-tuning job (`method.type: reinforcement`), checked in full and queued
    as a GRPO job. Graders: `string_check`, `text_similarity` (fuzzy_match), `python`, and `multi`
    over them with a weighted-sum `calculate_output`. A 400 names the OpenAI param at fault."""
    with db.transaction() as session:
        training = get_dataset(
            session=session, owner=owner, dataset_id=body.training_file, param="training_file"
        )
        translation = translate_job(body, training_rows=training.rows)
        try:
            job, created = submit_job(
                session=session,
                owner=owner,
                request=translation.job,
                settings=settings,
                idempotency_key=idempotency_key,
                extra_spec={"openai": translation.openai},
            )
        except ServiceError as exc:
            raise translation.reword(exc) from None
        if created:
            dispatcher.deliver_after_commit(session, job.id)
        return job_object(job, now=utcnow())


@router.get("", response_model=ListOut[FineTuningJobOut], responses=responses(400))
def list_fine_tuning_jobs(
    request: Request, db: DatabaseDep, owner: CurrentOwner, after: After = None, limit: PageSize = 20
) -> ListOut[FineTuningJobOut]:
    """Your jobs, newest first (those created with POST /v1/jobs too); `metadata[KEY]=VALUE`
    keeps the jobs whose metadata has that value."""
    metadata = {}
    for key, value in request.query_params.multi_items():
        match = METADATA_FILTER.match(key)
        if match and ('"' in match.group(1) or "\\" in match.group(1)):  # they would break SQLite's JSON path
            raise InvalidRequest("metadata keys with quotes or backslashes cannot be filtered on", param=key)
        if match:
            metadata[match.group(1)] = value
        elif key == "metadata":
            raise InvalidRequest("filter by metadata with metadata[KEY]=VALUE", param="metadata")
    with db.transaction() as session:
        jobs, has_more = list_jobs(session=session, owner=owner, after=after, limit=limit, metadata=metadata)
        now = utcnow()
        return ListOut(
            data=[job_object(job, now=now, latest_metrics=metrics) for job, metrics in jobs],
            has_more=has_more,
        )


@router.get("/{job_id}", response_model=FineTuningJobOut, responses=responses(404))
def retrieve_fine_tuning_job(db: DatabaseDep, owner: CurrentOwner, job_id: str) -> FineTuningJobOut:
    with db.transaction() as session:
        job, metrics = get_job_with_metrics(session=session, owner=owner, job_id=job_id)
        return job_object(job, now=utcnow(), latest_metrics=metrics)


@router.post("/{job_id}/cancel", response_model=FineTuningJobOut, responses=responses(404, 409))
def cancel_fine_tuning_job(
    db: DatabaseDep, settings: SettingsDep, owner: CurrentOwner, job_id: str, background: BackgroundTasks
) -> FineTuningJobOut:
    """A queued or paused job is cancelled at once; a running one after its current step."""
    with db.transaction() as session:
        job = request_cancel(session=session, owner=owner, job_id=job_id)
        shown = job_object(job, now=utcnow())
    send_webhook_after_response(background, job, db, settings)
    return shown


@router.post("/{job_id}/pause", response_model=FineTuningJobOut, responses=responses(404, 409))
def pause_fine_tuning_job(db: DatabaseDep, owner: CurrentOwner, job_id: str) -> FineTuningJobOut:
    """A queued job pauses at once; a running one after its current step, with a checkpoint."""
    with db.transaction() as session:
        return job_object(request_pause(session=session, owner=owner, job_id=job_id), now=utcnow())


@router.post("/{job_id}/resume", response_model=FineTuningJobOut, responses=responses(404, 409, 429))
def resume_fine_tuning_job(
    db: DatabaseDep, settings: SettingsDep, dispatcher: DispatcherDep, owner: CurrentOwner, job_id: str
) -> FineTuningJobOut:
    """Queue a paused job again; it continues from its newest checkpoint."""
    with db.transaction() as session:
        job = request_resume(
            session=session, owner=owner, job_id=job_id, max_active_jobs=settings.max_active_jobs_per_owner
        )
        dispatcher.deliver_after_commit(session, job_id)
        return job_object(job, now=utcnow())


@router.get("/{job_id}/events", response_model=ListOut[FineTuningJobEventOut], responses=responses(400, 404))
def list_fine_tuning_events(
    db: DatabaseDep, owner: CurrentOwner, job_id: str, after: After = None, limit: PageSize = 20
) -> ListOut[FineTuningJobEventOut]:
    """The job's log, newest first (`after`: an event id; the older ones follow it). The per-step
    metrics are at GET /v1/jobs/{id}/metrics."""
    before = None
    if after is not None:
        if not after.isdigit() or int(after) > 2**63 - 1:
            raise InvalidRequest(f"{after!r} is not an event id of this job", param="after")
        before = int(after)
    with db.transaction() as session:
        get_job(session=session, owner=owner, job_id=job_id)
        events, has_more = list_events_newest_first(
            session=session, job_id=job_id, before=before, limit=limit
        )
        return ListOut(data=[event_object(event) for event in events], has_more=has_more)


@router.get(
    "/{job_id}/checkpoints", response_model=ListOut[FineTuningCheckpointOut], responses=responses(400, 404)
)
def list_fine_tuning_checkpoints(
    request: Request,
    db: DatabaseDep,
    owner: CurrentOwner,
    job_id: str,
    after: After = None,
    limit: PageSize = 10,
) -> ListOut[FineTuningCheckpointOut]:
    """Complete checkpoints, newest first, with the metrics of their step; `download_url` streams
    one as a tar archive that `from_pretrained` loads once extracted."""
    before = None
    if after is not None:
        before = checkpoint_step(after)
        if before is None:
            raise InvalidRequest(f"{after!r} is not a checkpoint id of this job", param="after")
    with db.transaction() as session:
        job = get_job(session=session, owner=owner, job_id=job_id)
        newest = [
            c
            for c in reversed(list_checkpoints(session=session, job_id=job_id))
            if before is None or c.step < before
        ]
        data = []
        for checkpoint in newest[:limit]:
            rows, _ = list_metrics(
                session=session, owner=owner, job_id=job_id, after_step=checkpoint.step - 1, limit=1
            )
            metrics = (
                rows[0][1] if rows and rows[0][0] == checkpoint.step else None
            )  # (step, metrics, created_at)
            data.append(
                checkpoint_object(
                    job, checkpoint, metrics, download_url=download_url(request, job_id, checkpoint.step)
                )
            )
        return ListOut(data=data, has_more=len(newest) > limit)
