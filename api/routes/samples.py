"""``GET /v1/jobs/{id}/samples``: what the model actually writes, step by step."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import MAX_EVENT_ID, MAX_STEP, CurrentOwner, DatabaseDep, Limit
from api.errors import responses
from jobs.models import JobSample
from jobs.queries import get_job, list_samples
from jobs.schemas import Page, SampleOut

router = APIRouter(prefix="/v1/jobs", tags=["samples"])


def sample_out(sample: JobSample) -> SampleOut:
    data = sample.data
    return SampleOut(
        id=sample.id,
        job_id=sample.job_id,
        step=sample.step,
        prompt=data.get("prompt"),
        completion=data.get("completion") or "",
        reward=data.get("reward"),
        advantage=data.get("advantage"),
        rewards=data.get("rewards") or {},
        truncated=data.get("truncated"),
        created_at=sample.created_at,
    )


@router.get("/{job_id}/samples", response_model=Page[SampleOut], responses=responses(404, 422))
def get_samples(
    db: DatabaseDep,
    owner: CurrentOwner,
    job_id: str,
    limit: Limit = 20,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="The last id of the previous page.")] = 0,
    step: Annotated[int | None, Query(ge=1, le=MAX_STEP, description="Only this step's samples.")] = None,
) -> Page[SampleOut]:
    """A few completions of each step (the first of the first groups, up to the spec's
    `num_samples_logged`, default 4) with their rewards and advantages, in step order."""
    with db.transaction() as session:
        get_job(session=session, owner=owner, job_id=job_id)
        samples, has_more = list_samples(session=session, job_id=job_id, step=step, after=after, limit=limit)
        return Page(data=[sample_out(s) for s in samples], has_more=has_more)
