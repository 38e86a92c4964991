"""``/v1/files``, as OpenAI's: a training file uploaded here is one of your datasets."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from api.content_type import accepts
from api.deps import After, CurrentOwner, DatabaseDep, IdempotencyKey, SettingsDep
from api.errors import OpenAIRoute, responses
from api.openai.objects import file_object
from api.openai.schemas import FileDeleted, FileOut, ListOut
from jobs.datasets import prompt_from_messages, remove_dataset, store_dataset
from jobs.errors import DatasetNotFound, InvalidDataset, InvalidRequest
from jobs.queries import get_dataset, list_datasets
from jobs.store import content_disposition, open_store
from jobs.text import check_file_name

router = APIRouter(prefix="/v1/files", tags=["openai"], route_class=OpenAIRoute)

RFT_HINT = (
    'each line\'s messages, a list of {"role", "content"} with text content, are its prompt; '
    "every other field is handed to the graders as item"
)
JSONL_RESPONSE = {
    200: {
        "content": {"application/jsonl": {"schema": {"type": "string"}}},
        "description": "The file as stored: JSONL, each line with its `prompt`.",
    }
}
REDIRECT_RESPONSE = {
    307: {
        "description": "The file is in this server's object store, and clients fetch it there: "
        "`Location` is a URL valid for a few minutes (GRPO_STORE_PRESIGNED_DOWNLOADS)."
    }
}


@router.post(
    "",
    response_model=FileOut,
    responses=responses(400, 409, 413, 415),
    dependencies=[accepts("multipart/form-data")],
)
def create_file(
    db: DatabaseDep,
    settings: SettingsDep,
    owner: CurrentOwner,
    file: Annotated[
        UploadFile,
        File(
            description="JSONL; OpenAI's reinforcement fine-tuning format: "
            '`{"messages": [...], "reference_answer": ...}` a line.'
        ),
    ],
    purpose: Annotated[
        str, Form(min_length=1, max_length=64, description="`fine-tune`, the only purpose served here.")
    ],
    idempotency_key: IdempotencyKey = None,
) -> FileOut:
    """Upload a training file (multipart/form-data, as `client.files.create(file=..., purpose="fine-tune")`).
    Each line's `messages` become its `prompt` (the line keeps every other field for the graders);
    every line is checked now, and a 400 lists the bad ones."""
    if purpose != "fine-tune":
        raise InvalidRequest(
            f"purpose {purpose!r} is not served here; upload training data with purpose 'fine-tune'",
            param="purpose",
        )
    check_file_name(file.filename)
    with db.transaction() as session:
        try:
            dataset, _ = store_dataset(
                session=session,
                owner=owner,
                source=file.file,
                settings=settings,
                name=file.filename or "file.jsonl",
                idempotency_key=idempotency_key,
                convert=prompt_from_messages,
            )
        except InvalidDataset as exc:
            exc.message += f" ({RFT_HINT})"
            raise
        return file_object(dataset)


@router.get("", response_model=ListOut[FileOut], responses=responses(400))
def list_files(
    db: DatabaseDep,
    owner: CurrentOwner,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=10000, description="Page size.")] = 100,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    order: Annotated[Literal["desc"], Query(description="Newest first (`asc` is not served).")] = "desc",
) -> ListOut[FileOut]:
    """Your files (every dataset, whichever endpoint uploaded it), newest first."""
    if purpose not in (None, "fine-tune"):
        return ListOut(data=[], has_more=False)
    with db.transaction() as session:
        datasets, has_more = list_datasets(session=session, owner=owner, after=after, limit=limit)
        data = [file_object(dataset) for dataset in datasets]
    return ListOut(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{file_id}", response_model=FileOut, responses=responses(404))
def retrieve_file(db: DatabaseDep, owner: CurrentOwner, file_id: str) -> FileOut:
    with db.transaction() as session:
        return file_object(get_dataset(session=session, owner=owner, dataset_id=file_id))


@router.delete("/{file_id}", response_model=FileDeleted, responses=responses(404, 409))
def delete_file(db: DatabaseDep, settings: SettingsDep, owner: CurrentOwner, file_id: str) -> FileDeleted:
    """Delete a file no job uses (a 409 names a job that does)."""
    with db.transaction() as session:
        remove_dataset(session=session, owner=owner, dataset_id=file_id, settings=settings)
    return FileDeleted(id=file_id, deleted=True)


# HEAD answers as GET would (FileResponse sends no body to a HEAD; from the object store, its size
# is asked, no object opened), undocumented as the checkpoint download's (api/routes/checkpoints.py).
# Where GET redirects to a presigned URL, HEAD is answered here, with the object's size: S3 signs the
# method, so a URL presigned for GET answers a HEAD 403 (``curl -I -L`` would end there).
@router.head("/{file_id}/content", include_in_schema=False, name="head_file_content")
@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={**JSONL_RESPONSE, **REDIRECT_RESPONSE, **responses(404)},
)
def file_content(
    request: Request, db: DatabaseDep, settings: SettingsDep, owner: CurrentOwner, file_id: str
) -> Response:
    """The file as stored (after the conversion of its `messages` into `prompt`s). Where the server
    keeps files in an object store and lets clients fetch them there, a 307 to a short-lived URL."""
    with db.transaction() as session:
        dataset = get_dataset(session=session, owner=owner, dataset_id=file_id)
    path = settings.dataset_path(dataset.id)
    store = open_store(settings)
    if store is not None:
        key = store.key_of(path)
        head = request.method == "HEAD"
        if settings.store_presigned_downloads and not head:
            url = store.presign(key, filename=dataset.name, expires_s=settings.store_presigned_expiry_s)
            return RedirectResponse(url, status_code=307)
        # not uploaded through this API process: stream it from the store (a presigned GET's HEAD:
        # the size of the object that GET's URL fetches)
        if not path.is_file() or settings.store_presigned_downloads:
            size = store.size(key)
            if size is None:
                raise DatasetNotFound(file_id)
            headers = {"Content-Length": str(size), "Content-Disposition": content_disposition(dataset.name)}
            if head:
                return Response(media_type="application/jsonl", headers=headers)
            return StreamingResponse(
                store.read(key, size=size), media_type="application/jsonl", headers=headers
            )
    if not path.is_file():
        raise DatasetNotFound(file_id)
    return FileResponse(path, media_type="application/jsonl", filename=dataset.name)
