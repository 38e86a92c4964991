from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from fastapi.responses import JSONResponse

from api.content_type import accepts
from api.deps import (
    MAX_STEP,
    After,
    CurrentOwner,
    DatabaseDep,
    DispatcherDep,
    IdempotencyKey,
    Limit,
    SettingsDep,
    poll,
)
from api.errors import responses
from api.webhooks import send_webhook_after_response
from jobs.datasets import local_dataset
from jobs.estimate import estimate_job
from jobs.models import JobStatus
from jobs.queries import (
    count_active_jobs,
    get_job_with_metrics,
    list_jobs,
    list_metrics,
    request_cancel,
    request_pause,
    request_resume,
)
from jobs.schemas import JobCreate, JobEstimate, JobOut, MetricsOut, Page
from jobs.submission import check_job_request, submit_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# The two routes every client polls come first (FastAPI tries a request against the routes in
# order), are ``async`` (a kept answer needs no thread) and answer from ResponseCache: the JSON
# read last time, until the job changes.


@router.get("/{job_id}", response_model=JobOut, responses=responses(404))
async def show_job(request: Request, job_id: str) -> Response:
    """The job: status, step / max_steps, latest metrics, failure reason."""
    db, cache, owner = poll(request)

    def read() -> bytes:
        with db.read() as session:
            job = JobOut.from_job(*get_job_with_metrics(session=session, owner=owner, job_id=job_id))
        return job.model_dump_json().encode()

    return await cache.answer(job_id, (owner, "job"), read)


@router.get("/{job_id}/metrics", response_model=Page[MetricsOut], responses=responses(404, 422))
async def get_metrics(
    request: Request,
    job_id: str,
    after_step: Annotated[
        int,
        Query(ge=0, le=MAX_STEP, description=("Only steps after this one: poll with the last step seen.")),
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> Response:
    """Per-step metrics in step order."""
    db, cache, owner = poll(request)

    def read() -> bytes:
        with db.read() as session:
            rows, has_more = list_metrics(
                session=session, owner=owner, job_id=job_id, after_step=after_step, limit=limit
            )
        page = Page[MetricsOut](
            data=[
                MetricsOut(step=step, metrics=metrics, created_at=created_at)
                for step, metrics, created_at in rows
            ],
            has_more=has_more,
        )
        return page.model_dump_json().encode()

    return await cache.answer(job_id, (owner, "metrics", after_step, limit), read)


ESTIMATE_RESPONSE = {
    200: {
        "model": JobEstimate,
        "description": (
            "With `dry_run=true`: what the job would need (tokens per step, memory, time) and what would go "
            "wrong; nothing is created or queued."
        ),
    }
}


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    responses={**ESTIMATE_RESPONSE, **responses(404, 409, 413, 415, 422, 429)},
    dependencies=[accepts("application/json")],
)
def create_job(
    request: JobCreate,
    db: DatabaseDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    owner: CurrentOwner,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    dry_run: Annotated[
        bool,
        Query(
            description=(
                "Check the spec in full and answer (200) with an estimate of what the job would need, "
                "without creating or queueing it (an Idempotency-Key is then ignored)."
            )
        ),
    ] = False,
) -> JobOut | JSONResponse:
    """Check the spec in full (hyperparameters and this server's limits on them, rewards,
    datasets and the fields the rewards read, the base model) and queue the job. A 429 when
    you already have GRPO_MAX_ACTIVE_JOBS_PER_OWNER jobs queued or running. With `dry_run=true`,
    the same checks and an estimate instead (tokens per step, memory, time per step and in all,
    lengths beyond the model's context); a job whose lengths exceed its model's context is
    created with a warning event saying so."""
    if dry_run:
        with db.transaction() as session:  # several statements; it writes nothing
            checked = check_job_request(session=session, owner=owner, request=request, settings=settings)
            estimate = estimate_job(
                session=session,
                owner=owner,
                config=checked.config,
                base_model=request.base_model,
                dataset=local_dataset(settings, request.dataset_id),
                settings=settings,
                gpus=request.gpus,
            )
            active = count_active_jobs(session=session, owner=owner)
        if active >= settings.max_active_jobs_per_owner:
            estimate.warnings.append(
                f"you have {active} jobs queued or running, this server's limit "
                "(GRPO_MAX_ACTIVE_JOBS_PER_OWNER): creating it now would be refused (429)"
            )
        return JSONResponse(estimate.model_dump(mode="json"))
    with db.transaction() as session:
        job, created = submit_job(
            session=session, owner=owner, request=request, settings=settings, idempotency_key=idempotency_key
        )
        if created:
            dispatcher.deliver_after_commit(session, job.id)
        else:
            response.headers["Idempotent-Replayed"] = "true"
        return JobOut.from_job(*get_job_with_metrics(session=session, owner=owner, job_id=job.id))


@router.get("", response_model=Page[JobOut], responses=responses(422))
def get_jobs(
    db: DatabaseDep,
    owner: CurrentOwner,
    status: JobStatus | None = None,
    after: After = None,
    limit: Limit = 20,
) -> Page[JobOut]:
    with db.read() as session:
        jobs, has_more = list_jobs(session=session, owner=owner, status=status, after=after, limit=limit)
        return Page(data=[JobOut.from_job(job, metrics) for job, metrics in jobs], has_more=has_more)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=responses(404, 409))
def cancel_job(
    db: DatabaseDep, settings: SettingsDep, owner: CurrentOwner, job_id: str, background: BackgroundTasks
) -> JobOut:
    """A queued or paused job is cancelled at once; a running one stops after its current step
    (keeping its checkpoints) and then shows ``cancelled``."""
    with db.transaction() as session:
        job = request_cancel(session=session, owner=owner, job_id=job_id)
        shown = JobOut.from_job(*get_job_with_metrics(session=session, owner=owner, job_id=job_id))
    send_webhook_after_response(background, job, db, settings)
    return shown


@router.post("/{job_id}/pause", response_model=JobOut, responses=responses(404, 409))
def pause_job(db: DatabaseDep, owner: CurrentOwner, job_id: str) -> JobOut:
    """A queued job is paused at once; a running one stops after its current step, writes a
    checkpoint and then shows ``paused`` (``pause_requested`` until then). A 409 for a job that
    has ended or is being cancelled."""
    with db.transaction() as session:
        request_pause(session=session, owner=owner, job_id=job_id)
        return JobOut.from_job(*get_job_with_metrics(session=session, owner=owner, job_id=job_id))


@router.post("/{job_id}/resume", response_model=JobOut, responses=responses(404, 409, 429))
def resume_job(
    db: DatabaseDep, settings: SettingsDep, dispatcher: DispatcherDep, owner: CurrentOwner, job_id: str
) -> JobOut:
    """Queue a paused job again; it continues from its newest checkpoint, and its metrics go on
    from the step it reached. A 409 unless the job is ``paused``."""
    with db.transaction() as session:
        request_resume(
            session=session, owner=owner, job_id=job_id, max_active_jobs=settings.max_active_jobs_per_owner
        )
        dispatcher.deliver_after_commit(session, job_id)
        return JobOut.from_job(*get_job_with_metrics(session=session, owner=owner, job_id=job_id))
