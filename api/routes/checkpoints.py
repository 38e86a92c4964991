from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse

from api.deps import MAX_STEP, CurrentOwner, DatabaseDep, SettingsDep
from api.errors import responses
from api.streaming import tar_stream
from jobs.artifacts import checkpoint_files, inside
from jobs.errors import CheckpointNotFound
from jobs.queries import get_checkpoint, get_job, list_checkpoints
from jobs.schemas import CheckpointOut, Page

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])

TAR_RESPONSE = {200: {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
                      "description": "The checkpoint's Hugging Face directory as a tar stream."}}


@router.get("/{job_id}/checkpoints", response_model=Page[CheckpointOut], responses=responses(404))
def get_checkpoints(db: DatabaseDep, owner: CurrentOwner, job_id: str) -> Page[CheckpointOut]:
    """Complete checkpoints, oldest first (the trainer keeps the last few)."""
    with db.transaction() as session:
        get_job(session=session, owner=owner, job_id=job_id)
        checkpoints = list_checkpoints(session=session, job_id=job_id)
    return Page(has_more=False, data=[
        CheckpointOut(step=c.step, kind=c.kind, bytes=c.bytes, created_at=c.created_at,
                      download_url=f"/v1/jobs/{job_id}/checkpoints/{c.step}/download")
        for c in checkpoints])


@router.get("/{job_id}/checkpoints/{step}/download", response_class=StreamingResponse,
            responses={**TAR_RESPONSE, **responses(404, 422)})
def download_checkpoint(db: DatabaseDep, settings: SettingsDep, owner: CurrentOwner, job_id: str,
                        step: Annotated[int, Path(ge=0, le=MAX_STEP)]) -> StreamingResponse:
    """A tar of the checkpoint, ready for ``from_pretrained`` once extracted (the optimizer
    state that only resuming needs is left out)."""
    with db.transaction() as session:
        get_job(session=session, owner=owner, job_id=job_id)
        checkpoint = get_checkpoint(session=session, job_id=job_id, step=step)
    assert settings.artifact_dir is not None
    directory = inside(settings.artifact_dir, checkpoint.path)
    if directory is None or not directory.is_dir():
        raise CheckpointNotFound(job_id, step, reason="no longer has the files of that checkpoint")
    root = f"{job_id}-step-{step}"
    return StreamingResponse(tar_stream(checkpoint_files(directory), root), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{root}.tar"'})
