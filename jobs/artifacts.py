"""The artifact directory: uploaded datasets and each job's output (checkpoints, metrics.jsonl).

A checkpoint directory is a Hugging Face model (or PEFT adapter) directory plus a
``trainer_state/`` folder that only resuming needs; downloads leave that folder out.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.layout import STATE_DIR, checkpoint_name


def checkpoint_files(directory: Path) -> list[tuple[str, Path]]:
    """(name inside the checkpoint, path) of every file a user downloads, in a stable order."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not (Path(root) == directory and d == STATE_DIR))
        for name in sorted(names):
            path = Path(root) / name
            if path.is_symlink():  # a checkpoint holds plain files; a link could point anywhere
                continue
            files.append((path.relative_to(directory).as_posix(), path))
    return files


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
