from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from api.deps import After, DatabaseDep, Limit, SettingsDep
from api.errors import responses
from jobs.datasets import store_dataset
from jobs.queries import get_dataset, list_datasets
from jobs.schemas import DatasetOut, Page

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetOut, responses=responses(413, 422))
def upload_dataset(
    db: DatabaseDep, settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL: one object a line, each with a `prompt`.")],
    name: Annotated[str | None, Form(max_length=255, description="Defaults to the file's name.")] = None,
) -> DatasetOut:
    """Upload a JSONL dataset. Every line is checked now; a 422 lists the bad ones."""
    with db.transaction() as session:
        dataset = store_dataset(session=session, source=file.file, settings=settings,
                                name=name or file.filename or "dataset.jsonl")
        return DatasetOut.model_validate(dataset)


@router.get("", response_model=Page[DatasetOut], responses=responses(422))
def get_datasets(db: DatabaseDep, after: After = None, limit: Limit = 20) -> Page[DatasetOut]:
    with db.transaction() as session:
        datasets, has_more = list_datasets(session=session, after=after, limit=limit)
        return Page(data=[DatasetOut.model_validate(d) for d in datasets], has_more=has_more)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=responses(404))
def show_dataset(db: DatabaseDep, dataset_id: str) -> DatasetOut:
    with db.transaction() as session:
        return DatasetOut.model_validate(get_dataset(session=session, dataset_id=dataset_id))
