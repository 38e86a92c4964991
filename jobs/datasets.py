"""Dataset uploads: stream to disk, hash, and check every line with the trainer's row rules; with an
object store, the checked file goes there too (the local copy is this process's cache)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from jobs.cache import open_cache
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
from jobs.store import open_store
from jobs.text import find_unstorable
from trainer.data import chat_row, is_blank, json_field_path, json_over_limits, parse_json, parse_line
from trainer.errors import DatasetError

log = logging.getLogger(__name__)

MAX_REPORTED_LINES = 20
UPLOAD_PREFIX = ".upload-"  # an upload being checked, renamed to <dataset id>.jsonl once recorded
# An upload writes its temporary file as it checks it, so one untouched this long was left by a
# killed API process, not written by a live one (uploads from several API processes share the
# directory).
LEFTOVER_UPLOAD_AGE_S = 300.0
ENDPOINT = "POST /v1/datasets"  # what its Idempotency-Keys are scoped to


def prompt_from_messages(line: bytes) -> bytes:
    """One line of an OpenAI reinforcement fine-tuning file (``POST /v1/files``), as a row the
    trainer reads: its ``messages`` become the ``prompt`` (the row keeps them too, for graders
    that read ``item.messages``), as ``trainer.data.chat_row`` reads any chat-format row
    (``developer`` messages become ``system`` ones, text content parts are joined). It is written
    into the stored file, so ``GET /v1/files/{id}/content`` shows it. A line this cannot read goes
    through unchanged: the dataset check reports it."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return line
    if not isinstance(row, dict) or "prompt" in row or not isinstance(row.get("messages"), list):
        return line
    try:
        row = chat_row(row)
    except DatasetError:
        return line
    return json.dumps(row, ensure_ascii=False).encode() + b"\n"


def store_dataset(
    *,
    session: Session,
    owner: str,
    source: BinaryIO,
    name: str,
    settings: Settings,
    idempotency_key: str | None = None,
    convert: Callable[[bytes], bytes] | None = None,
) -> tuple[Dataset, bool]:
    """Check an upload and record it for ``owner``; if the transaction rolls back, the file goes too.
    ``convert`` rewrites each line before it is stored (see ``save_dataset``).

    With an ``idempotency_key`` used before (within ``settings.idempotency_ttl_s``) for the same
    name and content, the dataset made then is returned and nothing is stored. Returns the
    dataset and whether it is new.
    """
    saved = save_dataset(source, settings=settings, convert=convert)
    try:
        request_hash = hashlib.sha256(f"{name}\n{saved.sha256}".encode()).hexdigest()
        if idempotency_key:
            earlier = find_idempotent_resource(
                session=session,
                owner=owner,
                endpoint=ENDPOINT,
                key=idempotency_key,
                request_hash=request_hash,
                ttl_s=settings.idempotency_ttl_s,
            )
            if earlier is not None:
                saved.path.unlink()
                return get_dataset(session=session, owner=owner, dataset_id=earlier), False
        dataset = create_dataset(
            session=session,
            owner=owner,
            name=name,
            rows=saved.rows,
            bytes=saved.bytes,
            sha256=saved.sha256,
            fields=saved.fields,
        )
        if idempotency_key:
            remember_idempotency_key(
                session=session,
                owner=owner,
                endpoint=ENDPOINT,
                key=idempotency_key,
                request_hash=request_hash,
                resource_id=dataset.id,
                ttl_s=settings.idempotency_ttl_s,
            )
        final = settings.dataset_path(dataset.id)
        saved.path.replace(final)
    except BaseException:
        saved.path.unlink(missing_ok=True)
        raise
    store = open_store(settings)
    if store is not None:
        # Before the row is committed: a dataset a job can name is one every worker can fetch.
        # This process's copy stays, as its cache, brought back under its bound once committed.
        key = store.key_of(final)
        try:
            store.upload_file(final, key)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        call_after_rollback(session, lambda: store.delete(key))
        call_after_commit(session, open_cache(settings, store).make_room)
    call_after_rollback(session, lambda: final.unlink(missing_ok=True))
    return dataset, True


def local_dataset(settings: Settings, dataset_id: str) -> Path:
    """Where this process reads dataset ``dataset_id``: its local copy, fetched from the object
    store first when the operator set one and another process took the upload (the path may not
    exist if the dataset is gone from both)."""
    path = settings.dataset_path(dataset_id)
    store = open_store(settings)
    if store is not None and not path.is_file():
        try:
            return open_cache(settings, store).fetch_file(store.key_of(path))  # room made first
        except FileNotFoundError:
            pass
    return path


def remove_dataset(*, session: Session, owner: str, dataset_id: str, settings: Settings) -> Dataset:
    """Forget ``owner``'s dataset and, once that is committed, its file, in the object store too
    (``DatasetInUse`` while a job uses it). Other machines' cached copies stay until their
    operator clears them: nothing names the dataset any more."""
    dataset = delete_dataset(session=session, owner=owner, dataset_id=dataset_id)
    path = settings.dataset_path(dataset_id)
    store = open_store(settings)
    if store is not None:
        key = store.key_of(path)
        call_after_commit(session, lambda: store.delete(key))
    call_after_commit(session, lambda: path.unlink(missing_ok=True))
    return dataset


def remove_leftover_uploads(directory: Path, *, older_than_s: float = LEFTOVER_UPLOAD_AGE_S) -> int:
    """Delete the temporary files of uploads that never finished (their API process was killed),
    those untouched for ``older_than_s``; returns how many went."""
    cutoff, removed = time.time() - older_than_s, 0
    for path in directory.glob(f"{UPLOAD_PREFIX}*.jsonl") if directory.is_dir() else ():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # renamed or removed by the process that wrote it, or by another starting up
    if removed:
        log.info("removed %d unfinished upload(s) from %s", removed, directory)
    return removed


@dataclass
class DatasetFile:
    path: Path
    rows: int
    bytes: int
    sha256: str
    fields: list[str]  # keys present in every row


def save_dataset(
    source: BinaryIO, *, settings: Settings, convert: Callable[[bytes], bytes] | None = None
) -> DatasetFile:
    """Copy an upload into the datasets directory under a temporary name, checking it line by line.

    Memory holds one line (at most GRPO_MAX_DATASET_LINE_BYTES) and what checking it takes, whatever
    the file's size: each line's size, nesting and number of values are checked on its bytes before
    it is parsed. ``convert`` rewrites a line once it is known to be small and storable (the OpenAI
    files route turns ``messages`` into a ``prompt``); the stored file, its size and hash are what it
    returns. The caller renames the file once the dataset row exists. Raises ``PayloadTooLarge``
    (over a size limit, or past ``GRPO_MAX_DATASET_ROWS``) or ``InvalidDataset`` (with every bad
    line, up to twenty); on any error the file is removed.
    """
    directory = settings.datasets_dir
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=UPLOAD_PREFIX, suffix=".jsonl")
    path = Path(name)
    try:
        lines = LineChecker(settings, convert)
        digest, received, size = hashlib.sha256(), 0, 0
        with os.fdopen(fd, "wb") as out:
            for number, line in enumerate(read_lines(source, settings.max_dataset_line_bytes), start=1):
                received += len(line)
                line = lines.check(line, number)
                size += len(line)
                if max(received, size) > settings.max_dataset_bytes:
                    raise PayloadTooLarge(
                        f"the dataset is larger than this server's limit of "
                        f"{settings.max_dataset_bytes} bytes (GRPO_MAX_DATASET_BYTES)",
                        param="file",
                    )
                if not lines.bad:  # the upload is refused at the end anyway: no point storing the rest
                    digest.update(line)
                    out.write(line)
        rows, fields = lines.result()
        return DatasetFile(path=path, rows=rows, bytes=size, sha256=digest.hexdigest(), fields=fields)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def read_lines(source: BinaryIO, max_line_bytes: int) -> Iterator[bytes]:
    """The lines of ``source``, each with its ending; one longer than ``max_line_bytes`` (not
    counting its ending) is refused after reading no more than that much of it."""
    number = 0
    while line := source.readline(max_line_bytes + 2):
        number += 1
        if len(line.rstrip(b"\r\n")) > max_line_bytes:
            message = (
                f"line {number} is longer than this server's limit of {max_line_bytes} bytes a line "
                f"(GRPO_MAX_DATASET_LINE_BYTES); shorten that row"
            )
            raise PayloadTooLarge(message, param="file", details=[{"line": number, "message": message}])
        yield line


class LineChecker:
    """Checks JSONL lines one at a time with the trainer's row rules and this server's limits, and
    keeps what the dataset record needs: the row count, the fields every row has, the bad lines."""

    def __init__(self, settings: Settings, convert: Callable[[bytes], bytes] | None = None):
        self.settings, self.convert = settings, convert
        self.rows, self.bad, self.fields, self.problems = 0, 0, None, []

    def check(self, line: bytes, number: int) -> bytes:
        """``line`` as it is to be stored (converted); a bad line is noted and comes back as it was."""
        try:
            line, row = self._parse(line, number)
        except DatasetError as exc:
            self.bad += 1
            if len(self.problems) < MAX_REPORTED_LINES:
                self.problems.append({"line": number, "message": exc.reason})
            return line
        if row is not None:
            self.rows += 1
            if self.rows > self.settings.max_dataset_rows:
                raise PayloadTooLarge(
                    f"the dataset has more than {self.settings.max_dataset_rows} rows, this "
                    f"server's limit (GRPO_MAX_DATASET_ROWS)",
                    param="file",
                )
            self.fields = set(row) if self.fields is None else self.fields & set(row)
        return line

    def _parse(self, line: bytes, number: int) -> tuple[bytes, dict[str, Any] | None]:
        settings = self.settings
        over = json_over_limits(
            line, max_depth=settings.max_dataset_depth, max_values=settings.max_dataset_row_values
        )
        if over == "values":
            raise DatasetError(
                f"more than {settings.max_dataset_row_values} JSON values (fields, list items, "
                f"objects and lists) in one row, this server's limit (GRPO_MAX_DATASET_ROW_VALUES)"
            )
        if over == "depth":
            raise DatasetError(
                f"nested deeper than {settings.max_dataset_depth} levels of objects and lists, "
                f"this server's limit (GRPO_MAX_DATASET_DEPTH)"
            )
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError("not UTF-8 text; upload JSONL, one JSON object per line") from None
        if self.convert is not None and not is_blank(text):
            check_row_storable(parse_json(text, number), line)  # before convert parses and re-encodes it
            line = self.convert(line)
            text = line.decode("utf-8")
        row = parse_line(text, number, uploading=True)
        if row is not None:
            check_row_storable(row, line)
        return line, row

    def result(self) -> tuple[int, list[str]]:
        """Rows and common fields, or ``InvalidDataset`` naming the bad lines."""
        if self.bad:
            shown = "; ".join(f"line {p['line']}: {p['message']}" for p in self.problems[:3])
            raise InvalidDataset(
                f"{self.bad} bad line(s) — {shown}{' …' if self.bad > 3 else ''}",
                param="file",
                details=self.problems,
            )
        if self.rows == 0:
            raise InvalidDataset(
                'the dataset has no rows; upload JSONL with one {"prompt": ...} object per line', param="file"
            )
        return self.rows, sorted(self.fields or ())


def check_row_storable(row: Any, line: bytes) -> None:
    """``DatasetError`` naming the first string or key of ``row`` the database cannot store (a NUL,
    a lone surrogate). Both come only from ``\\u`` escapes (raw control characters are not JSON,
    and UTF-8 cannot encode a surrogate), so a line with none is not walked."""
    if b"\\u" not in line:
        return
    found = find_unstorable(row)
    if found is not None:
        path, reason = found
        raise DatasetError(f"{json_field_path(path)} {reason}")
