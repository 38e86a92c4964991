"""A training worker's side of the object store (``jobs.store``), when the operator set one: the
job's datasets and newest checkpoint brought into this machine's cache before it trains, its run
logs sent back after. Without a store none of this runs: the artifact directory is shared.

The job record is the truth about a job's checkpoints (a row is written only once its checkpoint
is complete in the store, ``worker.progress``), and the trainer the only one that deletes them. So
before a run, the job's local ``checkpoints/`` directory is laid out as the record says, whatever
this machine ran of the job before: the newest recorded checkpoint whole (fetched from the store),
the older recorded ones as placeholders holding only their step state (``trainer_state/state.json``),
and nothing else. The trainer resumes from the newest, and its pruning sees the older ones and
deletes them as it would have on the machine that wrote them, which deletes them from the store.

Fetches go through the cache (``jobs.cache``), which evicts what no run needs to keep the
directory under ``GRPO_STORE_CACHE_GIB``; a run holds its job directory and datasets in use
(``job_files_in_use``), so that no process of this cache evicts them while it runs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from jobs.cache import StoreCache, open_cache
from jobs.queries import delete_checkpoint, list_checkpoints
from jobs.settings import Settings
from jobs.store import ArtifactStore, StoreUnavailable
from trainer.errors import TrainingError
from trainer.layout import CHECKPOINT_NAME, STATE_DIR
from trainer.tracking import TENSORBOARD_DIR

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # trainer.loop writes it under the job directory
STEP_STATE = f"{STATE_DIR}/state.json"


def dataset_ids(spec: dict[str, Any]) -> list[str]:
    return [dataset_id for dataset_id in (spec["dataset_id"], spec.get("eval_dataset_id")) if dataset_id]


def fetch_datasets(spec: dict[str, Any], settings: Settings, cache: StoreCache) -> None:
    """Bring the job's datasets (``dataset_id``, ``eval_dataset_id``) into this machine's cache,
    where ``run_config_for`` points the trainer."""
    for dataset_id in dataset_ids(spec):
        try:
            cache.fetch_file(cache.store.key_of(settings.dataset_path(dataset_id)))
        except FileNotFoundError:
            raise TrainingError(
                f"dataset {dataset_id} is no longer in this server's artifact store; upload it "
                "again and create the job with the new dataset id"
            ) from None


def forget_unstored_checkpoints(
    *, job_id: str, job_dir: Path, store: ArtifactStore, write: Callable[[Callable[[Session], Any]], Any]
) -> list[int]:
    """Forget the recorded checkpoints that are not complete in the store (deleted by an attempt
    that died before it could forget them); returns their steps. ``write`` runs a unit of work."""
    root = store.key_of(job_dir / "checkpoints")
    complete = {f"{root}/{name}" for name in store.complete_dirs(root)}

    def forget(session: Session) -> list[int]:
        gone = [c.step for c in list_checkpoints(session=session, job_id=job_id) if c.path not in complete]
        for step in gone:
            delete_checkpoint(session=session, job_id=job_id, step=step)
        return gone

    return write(forget)


def restore_checkpoints(
    *, job_dir: Path, recorded: dict[int, str], store: ArtifactStore, cache: StoreCache | None = None
) -> int | None:
    """Lay out ``job_dir/checkpoints`` as the record says (``recorded``: step → stored path), and
    return the step the trainer will resume from (None: from the start). Raises
    ``StoreUnavailable`` if the newest recorded checkpoint cannot be fetched: resuming from an
    older one would redo steps the record has. Fetches through ``cache`` (default: unbounded)."""
    cache = cache or StoreCache(store)
    root = job_dir / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            match = CHECKPOINT_NAME.match(path.name)
            if path.is_dir() and (match is None or int(match.group(1)) not in recorded):
                # a .tmp- or .fetch- leftover, a checkpoint whose upload never completed, or one
                # another machine's run has pruned since
                shutil.rmtree(path, ignore_errors=True)
    if not recorded:
        return None
    newest = max(recorded)
    if cache.fetch_dir(recorded[newest]) is None:
        raise StoreUnavailable(f"the checkpoint of step {newest} is recorded but not complete in the store")
    for step, key in recorded.items():
        if step != newest:
            cache.fetch_dir(key, skip=lambda name: name != STEP_STATE)
    return newest


def prepare_run(
    *,
    job_id: str,
    spec: dict[str, Any],
    settings: Settings,
    store: ArtifactStore,
    write: Callable[[Callable[[Session], Any]], Any],
) -> list[int]:
    """Everything a run of job ``job_id`` needs from the store, in this machine's cache; returns the
    steps of the checkpoints forgotten because the store no longer had them."""
    job_dir, cache = settings.job_dir(job_id), open_cache(settings, store)
    fetch_datasets(spec, settings, cache)
    forgotten = forget_unstored_checkpoints(job_id=job_id, job_dir=job_dir, store=store, write=write)
    recorded = write(
        lambda session: {c.step: c.path for c in list_checkpoints(session=session, job_id=job_id)}
    )
    resume_step = restore_checkpoints(job_dir=job_dir, recorded=recorded, store=store, cache=cache)
    metrics = job_dir / METRICS_FILE
    if resume_step is not None and not metrics.exists():  # the trainer keeps its lines up to the resumed step
        try:
            store.download_file(store.key_of(metrics), metrics)
        except FileNotFoundError:
            pass
    return forgotten


@contextmanager
def job_files_in_use(
    *, job_id: str, spec: dict[str, Any], settings: Settings, store: ArtifactStore | None
) -> Iterator[None]:
    """While the block runs (a run of job ``job_id``: fetching, training, merging), its directory
    and datasets in this machine's cache are in use: no process of the cache evicts them. After it,
    the cache is brought back under its bound. Without a store, nothing: the artifact directory is
    the storage."""
    if store is None:
        yield
        return
    cache = open_cache(settings, store)
    try:
        with cache.in_use([settings.job_dir(job_id), *map(settings.dataset_path, dataset_ids(spec))]):
            yield
    finally:
        try:
            cache.make_room()
        except Exception:  # never the job's failure: the next fetch tries again
            log.warning("could not bring the artifact cache under GRPO_STORE_CACHE_GIB", exc_info=True)


def publish_run_logs(job_dir: Path, store: ArtifactStore) -> None:
    """Send the run's ``metrics.jsonl`` and TensorBoard event files to the store, so that a job
    trained on several machines has them in one place. Best effort: the job record holds the
    metrics, and a failure here is logged, never the job's."""
    files = [job_dir / METRICS_FILE]
    tensorboard = job_dir / TENSORBOARD_DIR
    if tensorboard.is_dir():
        files += sorted(path for path in tensorboard.rglob("*") if path.is_file() and not path.is_symlink())
    try:
        for path in files:
            if path.is_file():
                store.upload_file(path, store.key_of(path))
    except Exception:
        log.warning("could not send the run logs of %s to the artifact store", job_dir.name, exc_info=True)
