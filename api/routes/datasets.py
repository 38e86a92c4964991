from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from api.content_type import accepts
from api.deps import After, CurrentOwner, DatabaseDep, IdempotencyKey, Limit, SettingsDep
from api.errors import responses
from jobs.datasets import store_dataset
from jobs.queries import get_dataset, list_datasets
from jobs.schemas import DatasetOut, Page
from jobs.text import StorableStr, check_file_name

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses=responses(400, 409, 413, 415, 422),
    dependencies=[accepts("multipart/form-data")],
)
def upload_dataset(
    db: DatabaseDep,
    settings: SettingsDep,
    owner: CurrentOwner,
    response: Response,
    file: Annotated[UploadFile, File(description="JSONL: one object a line, each with a `prompt`.")],
    name: Annotated[
        StorableStr | None, Form(max_length=255, description="Defaults to the file's name.")
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> DatasetOut:
    """Upload a JSONL dataset (multipart/form-data). Every line is checked now; a 422 lists the
    bad ones (a row nested deeper than GRPO_MAX_DATASET_DEPTH, with more JSON values than
    GRPO_MAX_DATASET_ROW_VALUES, or with a NUL or an unpaired surrogate in a string or key is bad).
    Over GRPO_MAX_DATASET_BYTES or GRPO_MAX_DATASET_ROWS, or with a line longer than
    GRPO_MAX_DATASET_LINE_BYTES, it is a 413."""
    if name is None:
        check_file_name(file.filename)
    with db.transaction() as session:
        dataset, created = store_dataset(
            session=session,
            owner=owner,
            source=file.file,
            settings=settings,
            name=name or file.filename or "dataset.jsonl",
            idempotency_key=idempotency_key,
        )
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return DatasetOut.model_validate(dataset)


@router.get("", response_model=Page[DatasetOut], responses=responses(422))
def get_datasets(
    db: DatabaseDep, owner: CurrentOwner, after: After = None, limit: Limit = 20
) -> Page[DatasetOut]:
    with db.transaction() as session:
        datasets, has_more = list_datasets(session=session, owner=owner, after=after, limit=limit)
        return Page(data=[DatasetOut.model_validate(d) for d in datasets], has_more=has_more)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=responses(404))
def show_dataset(db: DatabaseDep, owner: CurrentOwner, dataset_id: str) -> DatasetOut:
    with db.transaction() as session:
        return DatasetOut.model_validate(get_dataset(session=session, owner=owner, dataset_id=dataset_id))
