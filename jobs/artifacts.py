"""The artifact directory: uploaded datasets and each job's output (checkpoints, metrics.jsonl).
With an object store (``jobs.store``) the same paths are keys in the store, and the directory is
each process's cache of it.

A checkpoint directory is a Hugging Face model (or PEFT adapter) directory plus a
``trainer_state/`` folder that only resuming needs; downloads leave that folder out.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from botocore.exceptions import ClientError

from jobs.store import CHUNK, MANIFEST, ArtifactStore
from trainer.layout import CHECKPOINT_NAME, STATE_DIR, checkpoint_name


@dataclass(frozen=True)
class ArtifactFile:
    """One file of a download, wherever its bytes are (a local directory, the object store)."""

    name: str  # inside the checkpoint
    size: int
    mtime: float
    chunks: Callable[[], Iterator[bytes]]  # its bytes, a piece at a time


def downloaded(name: str) -> bool:
    """Whether a checkpoint's file ``name`` goes into its download: not the resume state, not the
    store's manifest."""
    return name != MANIFEST and name.split("/", 1)[0] != STATE_DIR


def checkpoint_files(directory: Path) -> list[tuple[str, Path]]:
    """(name inside the checkpoint, path) of every file a user downloads, in a stable order."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not (Path(root) == directory and d == STATE_DIR))
        for name in sorted(names):
            path = Path(root) / name
            if path.is_symlink():  # a checkpoint holds plain files; a link could point anywhere
                continue
            relative = path.relative_to(directory).as_posix()
            if downloaded(relative):
                files.append((relative, path))
    return files


def local_files(directory: Path, handles: ExitStack | None) -> list[ArtifactFile]:
    """The download of a checkpoint directory on this machine, every file opened (and its size read
    from the open file) now, before a response starts: a file the trainer deletes afterwards (a
    checkpoint pruned by ``keep_last_checkpoints``) stays readable through its open handle, so
    the tar still completes. ``FileNotFoundError`` if one is already gone. Each handle closes once
    its bytes are sent, and all of them with ``handles`` (the stream's end, a client gone).

    Without ``handles`` (a ``HEAD``: the sizes, no bytes) each file is only looked at (``stat``),
    and opened when its bytes are read."""

    def reader(source: BinaryIO) -> Callable[[], Iterator[bytes]]:
        def chunks() -> Iterator[bytes]:
            with source:
                while chunk := source.read(CHUNK):
                    yield chunk

        return chunks

    def opened_later(path: Path) -> Callable[[], Iterator[bytes]]:
        return lambda: reader(path.open("rb"))()

    files = []
    if handles is None:
        for name, path in checkpoint_files(directory):
            stat = path.stat()
            files.append(ArtifactFile(name, stat.st_size, stat.st_mtime, opened_later(path)))
        return files
    for name, path in checkpoint_files(directory):
        source = handles.enter_context(path.open("rb"))
        stat = os.fstat(source.fileno())
        files.append(ArtifactFile(name, stat.st_size, stat.st_mtime, reader(source)))
    return files


def stored_files(
    store: ArtifactStore, key: str, handles: ExitStack | None = None
) -> list[ArtifactFile] | None:
    """The download of the checkpoint (or merged model) stored at ``key``, listed by its manifest:
    None while it is not complete in the store.

    With ``handles``, every object is opened (its first piece read) now, before a response
    starts, so a directory deleted afterwards (a checkpoint pruned by ``keep_last_checkpoints``)
    is read from the objects already open; ``FileNotFoundError`` if one is already gone. They
    close with ``handles``."""
    try:
        manifest = store.manifest(key)
    except ValueError:  # not a relative path: not an artifact the store holds
        return None
    if manifest is None:
        return None
    listed = sorted((name, size) for name, size in manifest.files.items() if downloaded(name))
    if handles is None:

        def reader(name: str, size: int) -> Callable[[], Iterator[bytes]]:
            return lambda: store.read(f"{key}/{name}", size=size)

        return [ArtifactFile(name, size, manifest.created, reader(name, size)) for name, size in listed]

    def opened(name: str, size: int) -> Callable[[], Iterator[bytes]]:
        pieces = store.read(f"{key}/{name}", size=size)
        handles.callback(pieces.close)  # closes the object's body
        try:
            first = next(pieces, b"")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object {key}/{name} in the artifact store") from exc
            raise
        return lambda: itertools.chain([first] if first else [], pieces)

    return [ArtifactFile(name, size, manifest.created, opened(name, size)) for name, size in listed]


def inside(artifact_dir: Path, stored: str) -> Path | None:
    """The artifact at the stored (relative) path ``stored``, or None if it resolves outside the
    artifact directory: an absolute path, ``..`` or a link never lead a download elsewhere."""
    root = artifact_dir.resolve()
    path = (root / stored).resolve()
    return path if path.is_relative_to(root) and path != root else None


def merged_dir(job_dir: Path, step: int) -> Path:
    """Where a LoRA job's adapter of ``step``, merged into its base model, is written (the
    worker does it for the final checkpoint when the job succeeds)."""
    return job_dir / "merged" / checkpoint_name(step)


def merged_steps(job_dir: Path, store: ArtifactStore | None) -> set[int]:
    """The steps of the job at ``job_dir`` whose adapter has a merged model: complete in the
    store, or in the artifact directory when there is no store."""
    root = job_dir / "merged"
    if store is None:
        names = [path.name for path in root.iterdir()] if root.is_dir() else []
    else:
        names = store.complete_dirs(store.key_of(root))
    return {int(match.group(1)) for name in names if (match := CHECKPOINT_NAME.match(name))}


def describe_checkpoint(directory: Path) -> tuple[str, int]:
    """Its kind (``model`` or ``adapter``) and the bytes a download carries."""
    kind = "adapter" if (directory / "adapter_config.json").is_file() else "model"
    return kind, sum(path.stat().st_size for _, path in checkpoint_files(directory))


def relative_to_artifacts(path: Path, artifact_dir: Path) -> str:
    """Stored paths are relative, so API and workers may mount the artifacts at different places."""
    try:
        return path.resolve().relative_to(artifact_dir.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
