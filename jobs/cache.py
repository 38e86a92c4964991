"""A process's artifact directory as a bounded cache of the object store (``GRPO_STORE_CACHE_GIB``).

With a store, ``GRPO_ARTIFACT_DIR`` holds copies: the datasets and checkpoints a training worker
fetched or wrote, the checkpoints and merged models an inference worker fetched to serve, the
datasets an API process received or read (an upload, a dry run's estimate). Before a fetch, the
cache makes room for what comes by evicting whole artifacts, least recently used first; after a
job ends, and after an upload, it is brought back under its bound (the job's checkpoints, the
upload, may have taken it over). Fetching or using an artifact marks it used (its mtime).

Only what is safely in the store is evicted:

- a directory holding the store's manifest (a checkpoint, a merged model, in the training layout
  or the serving cache): the manifest is written there only once the directory is complete in the
  store (uploaded from here, or fetched), and a stored directory leaves the store only when it is
  deleted on purpose (pruned);
- a dataset file that the store holds at the same size, or that it has not held for
  ``UPLOAD_GRACE_S``: deleted by its owner, rather than an upload that an API process sharing this
  directory is still sending.

Nothing else, but for one kind of garbage, freed first (before any stored artifact, however recently
used): the leftovers of a job's run that its next run on this machine would delete
(``worker.artifacts.restore_checkpoints``), the directories directly under ``jobs/<job>/checkpoints/``
named ``.tmp-…``/``.fetch-…`` (a write or fetch that died) or ``step-NNNNNN`` without the manifest (an
upload that died), once unchanged for ``LEFTOVER_GRACE_S`` (a margin: a write or upload in progress
is its run's, whose worker pins the job, and a job's processes on several devices die with their
worker, ``trainer.distributed.die_with_launcher``). A checkpoint being written or uploaded has no
manifest yet, and run logs are not artifacts. Nor is anything evicted or freed that a process of
this directory holds in use (``in_use``): a running job's directory and datasets, the checkpoint an
inference worker is answering from. A pin is a file under ``.cache/pins`` that its process keeps
locked (``flock``) while it lives, so the pins of a killed process lapse with it; pins are taken and
evictions made under one lock (``.cache/lock``), so an artifact is never evicted between a process
pinning it and using it.

Without a store there is no cache: the artifact directory is the storage, and nothing here runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from jobs.settings import Settings
from jobs.store import MANIFEST, ArtifactStore, StoreUnavailable, check_key, is_current
from trainer.layout import CHECKPOINT_NAME

log = logging.getLogger(__name__)

STATE_DIR = ".cache"  # under the artifact directory: the lock and the pins, never an artifact
DATASETS = "datasets"
UPLOAD_GRACE_S = 3600.0  # a dataset file absent from the store this long was deleted, not in flight
JOBS, CHECKPOINTS = "jobs", "checkpoints"  # a job's checkpoints: <artifact dir>/jobs/<job>/checkpoints
LEFTOVER_PREFIXES = (".tmp-", ".fetch-")  # a checkpoint's write (trainer.checkpoint), a fetch (jobs.store)
LEFTOVER_GRACE_S = 3600.0  # a leftover unchanged this long is no process's write or upload in progress


@dataclass(frozen=True)
class CachedArtifact:
    path: Path
    size: int  # bytes of its files
    used_ns: int  # when it was last fetched or used: its mtime


def mark_used(path: Path) -> None:
    """Record a use of the cached file or directory ``path`` (to the nanosecond: the file system's
    own clock ticks in milliseconds)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def disk_bytes(path: Path) -> int:
    """The bytes of the plain files at or under ``path`` (those that vanish meanwhile not counted)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


class StoreCache:
    """``store``'s local cache (its artifact directory), at most ``limit_bytes`` (None: unbounded,
    and then only uses are recorded)."""

    def __init__(self, store: ArtifactStore, limit_bytes: int | None = None):
        self.store, self.root, self.limit_bytes = store, store.cache, limit_bytes
        self.state = self.root / STATE_DIR

    # fetching

    def fetch_file(self, key: str) -> Path:
        """``store.fetch_file``, making room first when this cache has no copy; marks it used."""
        if not self.store.cache_path(key).is_file():
            self.make_room(self.store.size(key) or 0)
        path = self.store.fetch_file(key)
        mark_used(path)
        return path

    def fetch_dir(
        self, key: str, *, skip: Callable[[str], bool] = lambda name: False, into: Path | None = None
    ) -> Path | None:
        """``store.fetch_dir``, making room first when this cache has no copy of the stored version;
        marks it used."""
        manifest = self.store.manifest(key)
        if manifest is None:
            return None
        wanted = {name: size for name, size in manifest.files.items() if not skip(name)}
        if not is_current((into or self.root) / check_key(key), manifest, wanted):
            self.make_room(sum(wanted.values()))
        path = self.store.fetch_dir(key, skip=skip, into=into)
        if path is not None:
            mark_used(path)
        return path

    # eviction

    def make_room(self, incoming: int = 0) -> list[Path]:
        """Evict artifacts, least recently used first, until what this cache holds and ``incoming``
        more bytes fit its bound; returns what was evicted.

        The store is asked which candidates it holds outside the lock: each look-up is a request that
        boto3 retries for about a minute when the store is out of reach, and meanwhile every
        ``in_use`` (each chat request, each job start) would wait for the lock. So the candidates are
        picked under the lock, looked up without it, and evicted under it again only if still not in
        use and unchanged since (same size, same last use: what the look-up vouched for)."""
        if self.limit_bytes is None:
            return []
        with self._locked():
            over = disk_bytes(self.root) + incoming - self.limit_bytes
            if over <= 0:
                return []
            pinned = self._pinned()
            evicted = self._free_leftovers(over, pinned)  # no look-up: decided and freed in this hold
            over -= sum(disk for _, disk in evicted)
            if over <= 0:
                return [path for path, _ in evicted]
            candidates = [artifact for artifact in self._artifacts() if not self._held(artifact.path, pinned)]
        stored = self._stored_first(candidates, over)  # the store's look-ups: without the lock
        with self._locked():
            over = disk_bytes(self.root) + incoming - self.limit_bytes
            pinned = self._pinned()
            for artifact in stored:
                if over <= 0:
                    break
                if self._held(artifact.path, pinned) or self._cached(artifact.path) != artifact:
                    continue  # taken in use, used, or gone since it was looked up
                evict(artifact.path)
                over -= artifact.size
                evicted.append((artifact.path, artifact.size))
                log.info("evicted %s from the artifact cache (%d bytes)", artifact.path, artifact.size)
        if over > 0:
            log.warning(
                "the artifact cache %s needs %d MiB more than GRPO_STORE_CACHE_GIB=%g allows: the rest is "
                "in use or not yet in the store",
                self.root,
                -(-over // (1 << 20)),
                self.limit_bytes / (1 << 30),
            )
        return [path for path, _ in evicted]

    def _free_leftovers(self, over: int, pinned: set[str]) -> list[tuple[Path, int]]:
        """Under the lock: delete leftovers (see the module's docstring) that no live process holds
        in use, the longest unchanged first, until ``over`` bytes are freed; returns them and their
        bytes. Each is looked at again just before it goes (a write does not take the lock)."""
        freed: list[tuple[Path, int]] = []
        now = time.time_ns()
        for leftover in sorted(self._leftovers(), key=lambda a: (a.used_ns, str(a.path))):
            if over <= 0:
                break
            if now - leftover.used_ns <= LEFTOVER_GRACE_S * 1e9:
                break  # the rest changed more recently still
            if self._held(leftover.path, pinned) or self._leftover(leftover.path) != leftover:
                continue  # in use, or changed or gone since it was looked at
            shutil.rmtree(leftover.path, ignore_errors=True)
            if leftover.path.exists():  # not ours to delete (permissions): counted as kept
                continue
            over -= leftover.size
            freed.append((leftover.path, leftover.size))
            log.info(
                "freed %s from the artifact cache: a leftover of a job's run (%d bytes)",
                leftover.path,
                leftover.size,
            )
        return freed

    def _leftovers(self) -> list[CachedArtifact]:
        """The leftovers of jobs' runs in this cache, as they are now: directories directly under a
        ``jobs/<job>/checkpoints/`` (the training layout only: never a job's run logs or merged
        models, nor the serving cache) named ``.tmp-…``/``.fetch-…``, or ``step-NNNNNN`` without the
        manifest. Their ``used_ns`` is when anything in them last changed."""
        found = []
        for job in real_subdirs(self.root / JOBS):
            if job.name.startswith("."):
                continue  # no job's
            for path in real_subdirs(job / CHECKPOINTS):
                leftover = self._leftover(path)
                if leftover is not None:
                    found.append(leftover)
        return found

    def _leftover(self, path: Path) -> CachedArtifact | None:
        """``path`` as a leftover now (None if it is none, or gone)."""
        name = path.name
        if not (name.startswith(LEFTOVER_PREFIXES) or CHECKPOINT_NAME.match(name)):
            return None
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or (not name.startswith(".") and (path / MANIFEST).exists()):
                return None  # a link, or a stored checkpoint (the manifest's rule)
        except FileNotFoundError:
            return None
        size, changed = 0, info.st_mtime_ns
        for root, dirs, names in os.walk(path):
            for entry in dirs + names:
                try:
                    entry_info = os.lstat(os.path.join(root, entry))
                except FileNotFoundError:
                    continue
                changed = max(changed, entry_info.st_mtime_ns)
                if stat.S_ISREG(entry_info.st_mode):
                    size += entry_info.st_size
        return CachedArtifact(path, size, changed)

    def _stored_first(self, candidates: list[CachedArtifact], over: int) -> list[CachedArtifact]:
        """The least recently used of ``candidates`` that are safely in the store, enough of them to
        free ``over`` bytes (if there are)."""
        stored: list[CachedArtifact] = []
        for artifact in sorted(candidates, key=lambda a: (a.used_ns, str(a.path))):
            if over <= 0:
                break
            if self._in_store(artifact):
                stored.append(artifact)
                over -= artifact.size
        return stored

    def _artifacts(self) -> list[CachedArtifact]:
        """The whole artifacts in this cache: dataset files, and directories holding a manifest
        (never inside a dot-named one: a fetch, a write or this module's state in progress)."""
        found = []
        for root, dirs, names in os.walk(self.root):
            here = Path(root)
            dirs[:] = [name for name in dirs if not name.startswith(".")]
            paths: list[Path] = []
            if here == self.root / DATASETS:
                paths = [
                    here / name for name in names if name.endswith(".jsonl") and not name.startswith(".")
                ]
            elif MANIFEST in names and here != self.root:
                dirs[:], paths = [], [here]
            found += [artifact for artifact in map(self._cached, paths) if artifact is not None]
        return found

    def _cached(self, path: Path) -> CachedArtifact | None:
        """``path`` as a whole artifact now: a plain file, or a directory holding the manifest (None
        if gone meanwhile, or a link)."""
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None
        if stat.S_ISREG(info.st_mode):
            return CachedArtifact(path, info.st_size, info.st_mtime_ns)
        if stat.S_ISDIR(info.st_mode) and (path / MANIFEST).is_file():
            return CachedArtifact(path, disk_bytes(path), info.st_mtime_ns)
        return None

    def _in_store(self, artifact: CachedArtifact) -> bool:
        if artifact.path.is_dir():
            return True  # it holds the manifest: complete in the store
        try:
            stored = self.store.size(self.store.key_of(artifact.path))
        except (StoreUnavailable, ClientError):
            log.warning(
                "could not look up %s in the artifact store; keeping it", artifact.path, exc_info=True
            )
            return False
        if stored is None:
            return time.time_ns() - artifact.used_ns > UPLOAD_GRACE_S * 1e9
        return stored == artifact.size

    # pins

    @contextmanager
    def in_use(self, paths: Iterable[Path]) -> Iterator[None]:
        """Hold ``paths`` (artifacts of this cache, or directories holding some) in use while the
        block runs: no process of this cache evicts them, even before they are fetched."""
        names = "\n".join(self._name(path) for path in paths)
        pins = self.state / "pins"
        pins.mkdir(parents=True, exist_ok=True)
        pin = pins / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.pin"
        with self._locked():  # an evictor sees it whole and locked, or not at all
            held = pin.open("w")
            fcntl.flock(held, fcntl.LOCK_EX)  # released when this process closes it, or dies
            held.write(names)
            held.flush()
        try:
            yield
        finally:
            pin.unlink(missing_ok=True)
            held.close()

    def _pinned(self) -> set[str]:
        """What live processes hold in use; the pins of processes that are gone are deleted."""
        names: set[str] = set()
        pins = self.state / "pins"
        for pin in pins.iterdir() if pins.is_dir() else ():
            try:
                with pin.open() as held:
                    try:
                        fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:  # its process holds it
                        names.update(line for line in held.read().splitlines() if line)
                        continue
                pin.unlink(missing_ok=True)
            except FileNotFoundError:  # released meanwhile
                continue
        return names

    def _held(self, path: Path, pinned: set[str]) -> bool:
        name = path.relative_to(self.root).as_posix()
        return any(
            name == held or name.startswith(f"{held}/") or held.startswith(f"{name}/") for held in pinned
        )

    def _name(self, path: Path) -> str:
        return path.resolve().relative_to(self.root.resolve()).as_posix()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state.mkdir(parents=True, exist_ok=True)
        with (self.state / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def real_subdirs(directory: Path) -> list[Path]:
    """The directories directly in ``directory``, links left out; none if it is not a directory
    (or a link to one)."""
    try:
        if not stat.S_ISDIR(directory.lstat().st_mode):
            return []
        with os.scandir(directory) as entries:
            return [directory / entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def evict(path: Path) -> None:
    """Delete a cached file, or a directory manifest first (from then on no reader takes what is
    left of it for a current copy, as in the store)."""
    if path.is_dir():
        (path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def open_cache(settings: Settings, store: ArtifactStore) -> StoreCache:
    """The cache of ``store`` that ``settings`` bound (``store_cache_gib``; 0: unbounded)."""
    gib = settings.store_cache_gib
    return StoreCache(store, limit_bytes=int(gib * (1 << 30)) if gib > 0 else None)
