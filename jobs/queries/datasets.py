from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from jobs.errors import DatasetInUse, DatasetNotFound
from jobs.models import Dataset, Job, new_id
from jobs.queries._util import page


def create_dataset(
    *,
    session: Session,
    owner: str,
    name: str,
    rows: int,
    bytes: int,
    sha256: str,
    fields: list[str],
    dataset_id: str | None = None,
) -> Dataset:
    dataset = Dataset(
        id=dataset_id or new_id("ds"),
        owner=owner,
        name=name,
        rows=rows,
        bytes=bytes,
        sha256=sha256,
        fields=fields,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(*, session: Session, owner: str, dataset_id: str, param: str | None = None) -> Dataset:
    """``owner``'s dataset; another owner's is ``DatasetNotFound`` exactly like a missing one."""
    dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner))
    if dataset is None:
        raise DatasetNotFound(dataset_id, param=param)
    return dataset


def list_datasets(
    *, session: Session, owner: str, after: str | None = None, limit: int = 20
) -> tuple[list[Dataset], bool]:
    """Newest first; ``after`` is the last id of the previous page."""
    stmt = select(Dataset).where(Dataset.owner == owner).order_by(Dataset.id.desc())
    if after:
        stmt = stmt.where(Dataset.id < after)
    return page(session, stmt, limit=limit)


def delete_dataset(*, session: Session, owner: str, dataset_id: str) -> Dataset:
    """Forget ``owner``'s dataset (the caller removes its file); ``DatasetInUse`` while a job refers to it."""
    dataset = get_dataset(session=session, owner=owner, dataset_id=dataset_id)
    job_id = session.scalar(
        select(Job.id).where(or_(Job.dataset_id == dataset_id, Job.eval_dataset_id == dataset_id)).limit(1)
    )
    if job_id is not None:
        raise DatasetInUse(dataset_id, job_id)
    session.delete(dataset)
    session.flush()
    return dataset
