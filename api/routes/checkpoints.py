from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from api.deps import MAX_STEP, CurrentOwner, DatabaseDep, SettingsDep
from api.errors import responses
from api.streaming import tar_size, tar_stream
from jobs.artifacts import ArtifactFile, inside, local_files, merged_dir, merged_steps, stored_files
from jobs.errors import CheckpointNotFound, InvalidRequest
from jobs.models import Checkpoint
from jobs.queries import get_checkpoint, get_job, list_checkpoints
from jobs.schemas import CheckpointOut, Page
from jobs.settings import Settings
from jobs.store import open_store

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])

TAR_RESPONSE = {
    200: {
        "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The checkpoint's Hugging Face directory as a tar stream.",
    }
}


@router.get("/{job_id}/checkpoints", response_model=Page[CheckpointOut], responses=responses(404))
def get_checkpoints(
    request: Request, db: DatabaseDep, settings: SettingsDep, owner: CurrentOwner, job_id: str
) -> Page[CheckpointOut]:
    """Complete checkpoints, oldest first (the trainer keeps the last few, and the best by
    `keep_best_by`), each with its figures on the eval set."""
    with db.transaction() as session:
        job = get_job(session=session, owner=owner, job_id=job_id)
        checkpoints = list_checkpoints(session=session, job_id=job_id)
    merged = (
        merged_steps(settings.job_dir(job_id), open_store(settings))
        if any(c.kind == "adapter" for c in checkpoints)
        else set()
    )
    return Page(
        has_more=False,
        data=[
            checkpoint_out(request, c, merged=c.step in merged, best_step=job.best_checkpoint_step)
            for c in checkpoints
        ],
    )


def download_url(request: Request, job_id: str, step: int) -> str:
    """Where a checkpoint downloads: an absolute URL, from the one this request came to (its
    scheme, host and any root path). A host-relative ``/v1/...`` doubled its ``/v1`` when a client
    joined it to an OpenAI-style base URL (``http://host/v1`` + ``/v1/jobs/...``); an absolute
    one reads the same to every client. Behind a proxy, uvicorn's ``--proxy-headers`` (and
    ``--forwarded-allow-ips``) make it the public address."""
    return str(request.url_for("download_checkpoint", job_id=job_id, step=str(step)))


def checkpoint_out(
    request: Request, checkpoint: Checkpoint, *, merged: bool, best_step: int | None = None
) -> CheckpointOut:
    url = download_url(request, checkpoint.job_id, checkpoint.step)
    merged = merged and checkpoint.kind == "adapter"
    return CheckpointOut(
        step=checkpoint.step,
        kind=checkpoint.kind,
        bytes=checkpoint.bytes,
        created_at=checkpoint.created_at,
        download_url=url,
        merged_download_url=f"{url}?format=merged" if merged else None,
        eval=checkpoint.eval_metrics,
        best=checkpoint.step == best_step,
    )


# HEAD answers as GET would, without opening a file or object: the undocumented twin of each
# download route (the OpenAPI document lists GET; a 405's Allow names HEAD too).
@router.head("/{job_id}/checkpoints/{step}/download", include_in_schema=False, name="head_checkpoint")
@router.get(
    "/{job_id}/checkpoints/{step}/download",
    response_class=StreamingResponse,
    responses={**TAR_RESPONSE, **responses(404, 422)},
)
def download_checkpoint(
    request: Request,
    db: DatabaseDep,
    settings: SettingsDep,
    owner: CurrentOwner,
    job_id: str,
    step: Annotated[int, Path(ge=0, le=MAX_STEP)],
    format: Annotated[
        Literal["adapter", "merged"] | None,
        Query(
            description=(
                "A LoRA job's checkpoint: `adapter` (the default) or `merged` into its base "
                "model (its final checkpoint, once it succeeded). A full model is the same "
                "either way but has no `adapter`."
            )
        ),
    ] = None,
) -> Response:
    """A tar of the checkpoint, ready for ``from_pretrained`` once extracted (the optimizer
    state that only resuming needs is left out)."""
    head = request.method == "HEAD"
    with db.transaction() as session:
        get_job(session=session, owner=owner, job_id=job_id)
        checkpoint = get_checkpoint(session=session, job_id=job_id, step=step)
    if format == "adapter" and checkpoint.kind == "model":
        raise InvalidRequest(
            f"the checkpoint of step {step} is a full model (the job trained every parameter, "
            "not a LoRA adapter); download it without format",
            param="format",
        )
    root = f"{job_id}-step-{step}"
    # Every file is opened before the response starts, and stays open until the stream ends (or
    # the client goes): a checkpoint the trainer prunes meanwhile still downloads whole. A HEAD
    # lists them (their sizes) and opens none.
    handles = ExitStack()
    opening = None if head else handles
    try:
        if format == "merged" and checkpoint.kind == "adapter":
            assert settings.artifact_dir is not None
            merged = merged_dir(settings.job_dir(job_id), step)
            try:
                files = download_files(
                    settings, merged.relative_to(settings.artifact_dir).as_posix(), opening
                )
            except FileNotFoundError:
                files = None
            root = f"{root}-merged"
            if files is None:
                raise CheckpointNotFound(
                    job_id,
                    step,
                    reason=(
                        "has no merged model at that step: a LoRA job's adapter is merged into its base "
                        "model for the final checkpoint when the job succeeds; download format=adapter "
                        "and merge it yourself with `python -m trainer export-merged ADAPTER_DIR OUT_DIR`"
                    ),
                )
        else:
            try:
                files = download_files(settings, checkpoint.path, opening, recorded_bytes=checkpoint.bytes)
            except FileNotFoundError:  # deleted while it was being opened
                files = None
            if files is None:
                raise CheckpointNotFound(job_id, step, reason=PRUNED)
    except BaseException:
        handles.close()
        raise
    headers = {
        "Content-Length": str(tar_size(files, root)),
        "Content-Disposition": f'attachment; filename="{root}.tar"',
    }
    if head:
        return Response(media_type="application/x-tar", headers=headers)
    return StreamingResponse(
        closing(tar_stream(files, root), handles), media_type="application/x-tar", headers=headers
    )


# What a checkpoint row whose files are gone most likely is: one the trainer deleted to keep the last few.
PRUNED = (
    "no longer has the files of that checkpoint: it was pruned (deleted by keep_last_checkpoints, "
    "which keeps the newest few and the best)"
)


def closing(chunks: Iterator[bytes], handles: ExitStack) -> Iterator[bytes]:
    """``chunks``, then ``handles`` closed: when the stream ends, fails, or is dropped (a client
    that went away: the generator is closed)."""
    with handles:
        yield from chunks


def download_files(
    settings: Settings, stored: str, handles: ExitStack | None, *, recorded_bytes: int | None = None
) -> list[ArtifactFile] | None:
    """The files a download of the directory at stored path ``stored`` carries, opened now (their
    handles close with ``handles``; without, a HEAD's, only listed with their sizes): streamed
    from the object store when there is one, else read from the artifact directory; None if it
    has none (complete). ``FileNotFoundError`` if a file is deleted while they are being opened,
    or if a local directory carries fewer bytes than ``recorded_bytes`` (what the worker
    recorded): its files were being deleted as they were listed. (The store lists a directory by
    its manifest, which is deleted first.)"""
    store = open_store(settings)
    if store is not None:
        return stored_files(store, stored, handles)
    assert settings.artifact_dir is not None
    directory = inside(settings.artifact_dir, stored)
    if directory is None or not directory.is_dir():
        return None
    files = local_files(directory, handles)
    if recorded_bytes is not None and sum(file.size for file in files) < recorded_bytes:
        raise FileNotFoundError(f"{stored} has fewer bytes than were recorded: it is being deleted")
    return files
