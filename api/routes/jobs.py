from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from api.deps import After, DatabaseDep, DispatcherDep, Limit
from api.errors import responses
from jobs.models import JobStatus
from jobs.queries import get_job_with_metrics, list_jobs, list_metrics, request_cancel
from jobs.schemas import JobCreate, JobOut, MetricsOut, Page
from jobs.specs import submit_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobOut, responses=responses(404, 409, 422))
def create_job(
    request: JobCreate, db: DatabaseDep, dispatcher: DispatcherDep, response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255, description=(
        "Retrying with the same key and body returns the job made the first time."))] = None,
) -> JobOut:
    """Check the spec in full (hyperparameters, rewards, datasets and the fields the rewards
    read, the base model) and queue the job."""
    with db.transaction() as session:
        job, created = submit_job(session=session, request=request, idempotency_key=idempotency_key)
        if created:
            dispatcher.deliver_after_commit(session, job.id)
        else:
            response.headers["Idempotent-Replayed"] = "true"
        return JobOut.from_job(*get_job_with_metrics(session=session, job_id=job.id))


@router.get("", response_model=Page[JobOut], responses=responses(422))
def get_jobs(db: DatabaseDep, status: JobStatus | None = None, after: After = None,
             limit: Limit = 20) -> Page[JobOut]:
    with db.transaction() as session:
        jobs, has_more = list_jobs(session=session, status=status, after=after, limit=limit)
        return Page(data=[JobOut.from_job(job, metrics) for job, metrics in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=JobOut, responses=responses(404))
def show_job(db: DatabaseDep, job_id: str) -> JobOut:
    with db.transaction() as session:
        return JobOut.from_job(*get_job_with_metrics(session=session, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=responses(404, 409))
def cancel_job(db: DatabaseDep, job_id: str) -> JobOut:
    """A queued job is cancelled at once; a running one stops after its current step (keeping
    its checkpoints) and then shows ``cancelled``."""
    with db.transaction() as session:
        request_cancel(session=session, job_id=job_id)
        return JobOut.from_job(*get_job_with_metrics(session=session, job_id=job_id))


@router.get("/{job_id}/metrics", response_model=Page[MetricsOut], responses=responses(404, 422))
def get_metrics(
    db: DatabaseDep, job_id: str,
    after_step: Annotated[int, Query(ge=0, description="Only steps after this one: poll with the last step seen.")] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> Page[MetricsOut]:
    """Per-step metrics in step order."""
    with db.transaction() as session:
        rows, has_more = list_metrics(session=session, job_id=job_id, after_step=after_step, limit=limit)
        return Page(data=[MetricsOut.model_validate(row) for row in rows], has_more=has_more)
