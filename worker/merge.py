"""A LoRA job's final adapter, merged into its base model so that users can download a plain model."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from jobs.artifacts import merged_dir
from jobs.store import ArtifactStore
from trainer.checkpoint import export_merged
from trainer.progress import Progress

log = logging.getLogger(__name__)


def write_merged_model(checkpoint: Path, job_dir: Path, step: int) -> Path:
    """Merge the adapter checkpoint of ``step`` into its base model under ``merged_dir`` (written
    under a temporary name and renamed, so a half-written model is never served)."""
    target = merged_dir(job_dir, step)
    if target.is_dir():  # a replayed end of the same job
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        export_merged(checkpoint, partial)
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("merged the adapter of step %d into its base model: %s", step, target)
    return target


def merge_final_adapter(
    checkpoint: Path, job_dir: Path, step: int, progress: Progress, store: ArtifactStore | None = None
) -> None:
    """After a LoRA job's last step: the merged model (sent to the object store, with one), or a
    warning saying why there is none (the adapter is the result either way, so a failed merge does
    not fail the job)."""
    progress.on_log("info", f"merging the adapter of step {step} into its base model")
    try:
        merged = write_merged_model(checkpoint, job_dir, step)
        if store is not None and store.manifest(key := store.key_of(merged)) is None:
            store.upload_dir(merged, key)
    except Exception as exc:
        log.exception("merging the adapter of step %d failed", step)
        progress.on_log(
            "warning",
            f"the adapter of step {step} could not be merged into its base model "
            f"({type(exc).__name__}: {str(exc)[:300]}); download the adapter and merge it "
            "with `python -m trainer export-merged`",
        )
        return
    progress.on_log("info", f"merged model of step {step} written: download it with format=merged")
