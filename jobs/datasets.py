"""Dataset uploads: stream to disk, hash, and check every line with the trainer's row rules."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from jobs.db import call_after_commit, call_after_rollback
from jobs.errors import InvalidDataset, PayloadTooLarge
from jobs.models import Dataset
from jobs.queries import (
    create_dataset,
    delete_dataset,
    find_idempotent_resource,
    get_dataset,
    remember_idempotency_key,
)
from jobs.settings import Settings
from trainer.data import parse_line
from trainer.errors import DatasetError

CHUNK = 1 << 20
MAX_REPORTED_LINES = 20
ENDPOINT = "POST /v1/datasets"  # what its Idempotency-Keys are scoped to


def store_dataset(*, session: Session, owner: str, source: BinaryIO, name: str, settings: Settings,
                  idempotency_key: str | None = None) -> tuple[Dataset, bool]:
    """Check an upload and record it for ``owner``; if the transaction rolls back, the file goes too.

    With an ``idempotency_key`` used before (within ``settings.idempotency_ttl_s``) for the same
    name and content, the dataset made then is returned and nothing is stored. Returns the
    dataset and whether it is new.
    """
    saved = save_dataset(source, settings.datasets_dir, max_bytes=settings.max_dataset_bytes,
                         max_rows=settings.max_dataset_rows)
    try:
        request_hash = hashlib.sha256(f"{name}\n{saved.sha256}".encode()).hexdigest()
        if idempotency_key:
            earlier = find_idempotent_resource(session=session, owner=owner, endpoint=ENDPOINT, key=idempotency_key,
                                               request_hash=request_hash, ttl_s=settings.idempotency_ttl_s)
            if earlier is not None:
                saved.path.unlink()
                return get_dataset(session=session, owner=owner, dataset_id=earlier), False
        dataset = create_dataset(session=session, owner=owner, name=name, rows=saved.rows, bytes=saved.bytes,
                                 sha256=saved.sha256, fields=saved.fields)
        if idempotency_key:
            remember_idempotency_key(session=session, owner=owner, endpoint=ENDPOINT, key=idempotency_key,
                                     request_hash=request_hash, resource_id=dataset.id,
                                     ttl_s=settings.idempotency_ttl_s)
        final = settings.dataset_path(dataset.id)
        saved.path.replace(final)
    except BaseException:
        saved.path.unlink(missing_ok=True)
        raise
    call_after_rollback(session, lambda: final.unlink(missing_ok=True))
    return dataset, True


def remove_dataset(*, session: Session, owner: str, dataset_id: str, settings: Settings) -> Dataset:
    """Forget ``owner``'s dataset and, once that is committed, its file (``DatasetInUse`` while a job uses it)."""
    dataset = delete_dataset(session=session, owner=owner, dataset_id=dataset_id)
    path = settings.dataset_path(dataset_id)
    call_after_commit(session, lambda: path.unlink(missing_ok=True))
    return dataset


@dataclass
class DatasetFile:
    path: Path
    rows: int
    bytes: int
    sha256: str
    fields: list[str]  # keys present in every row


def save_dataset(source: BinaryIO, directory: Path, *, max_bytes: int, max_rows: int) -> DatasetFile:
    """Copy an upload into ``directory`` under a temporary name and check it.

    The caller renames the file once the dataset row exists. Raises ``PayloadTooLarge`` (over
    ``max_bytes`` or ``max_rows``) or ``InvalidDataset`` (with every bad line, up to twenty); on
    any error the file is removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=".jsonl")
    path = Path(name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"the dataset is larger than this server's limit of {max_bytes} "
                                          f"bytes (GRPO_MAX_DATASET_BYTES)", param="file")
                digest.update(chunk)
                out.write(chunk)
        rows, fields = check_lines(path, max_rows=max_rows)
        return DatasetFile(path=path, rows=rows, bytes=size, sha256=digest.hexdigest(), fields=fields)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def check_lines(path: Path, *, max_rows: int) -> tuple[int, list[str]]:
    """Rows and common fields of a JSONL file, or ``InvalidDataset`` naming the bad lines
    (``PayloadTooLarge`` past ``max_rows``)."""
    rows, bad, fields, problems = 0, 0, None, []
    try:
        with path.open(encoding="utf-8") as lines:
            for number, text in enumerate(lines, start=1):
                try:
                    row = parse_line(text, number)
                except DatasetError as exc:
                    bad += 1
                    if len(problems) < MAX_REPORTED_LINES:
                        problems.append({"line": number, "message": exc.reason})
                    continue
                if row is None:
                    continue  # a blank line, skipped by the trainer too
                rows += 1
                if rows > max_rows:
                    raise PayloadTooLarge(f"the dataset has more than {max_rows} rows, this server's limit "
                                          f"(GRPO_MAX_DATASET_ROWS)", param="file")
                fields = set(row) if fields is None else fields & set(row)
    except UnicodeDecodeError:
        raise InvalidDataset("the file is not UTF-8 text; upload JSONL, one JSON object per line",
                             param="file") from None
    if bad:
        shown = "; ".join(f"line {p['line']}: {p['message']}" for p in problems[:3])
        raise InvalidDataset(f"{bad} bad line(s) — {shown}{' …' if bad > 3 else ''}", param="file",
                             details=problems)
    if rows == 0:
        raise InvalidDataset("the dataset has no rows; upload JSONL with one {\"prompt\": ...} object per line",
                             param="file")
    return rows, sorted(fields or ())

