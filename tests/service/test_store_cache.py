"""A worker's artifact directory as a bounded cache of the object store (jobs/cache.py), against a
real S3 server (SeaweedFS): least recently used artifacts evicted, never one in use (by this process
or another) or not safely in the store; the leftovers of a job's run (a checkpoint whose upload died,
a write that died) freed first, unless in use; a job whose checkpoint was evicted resumes from the
store; and without a store nothing is ever evicted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from jobs.artifacts import merged_dir
from jobs.cache import LEFTOVER_GRACE_S, StoreCache, disk_bytes, mark_used, open_cache
from jobs.settings import Settings
from jobs.store import MANIFEST, ArtifactStore, open_store
from tests.service.e2e import metric_steps, status_changes, wait_for_status, wait_for_step, wait_until_ended
from tests.service.factories import ROOT, WorkerProcess, api_key, bearer, job_spec, settings_env, upload
from tests.service.faults import TcpProxy
from tests.service.s3 import S3Server
from trainer.tracking import TENSORBOARD_DIR
from worker.artifacts import METRICS_FILE, job_files_in_use
from worker.inference import SERVING_CACHE, serving_files_in_use


@pytest.fixture
def store(s3_server: S3Server, tmp_path: Path) -> ArtifactStore:
    """A store under a prefix of its own, with ``tmp_path/cache`` as its local cache."""
    store = open_store(Settings(data_dir=tmp_path, artifact_dir=tmp_path / "cache", **s3_server.settings()))
    assert store is not None
    return store


def stored_dataset(store: ArtifactStore, tmp_path: Path, name: str, size: int = 1000) -> str:
    """Upload a dataset file from elsewhere (the API's machine); its key."""
    source = tmp_path / "elsewhere" / name
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"x" * size)
    store.upload_file(source, f"datasets/{name}")
    return f"datasets/{name}"


def stored_checkpoint(store: ArtifactStore, tmp_path: Path, job_id: str, step: int = 2) -> str:
    """Upload a checkpoint from elsewhere (another worker); its key."""
    key = f"jobs/{job_id}/checkpoints/step-{step:06d}"
    directory = tmp_path / "elsewhere" / key
    (directory / "trainer_state").mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"w" * 1200)
    (directory / "trainer_state" / "state.json").write_text(f'{{"step": {step}}}')
    store.upload_dir(directory, key)
    return key


def aged(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_a_cache_over_its_bound_evicts_the_least_recently_used_and_never_what_is_in_use(
    store: ArtifactStore, tmp_path: Path
) -> None:
    cache = StoreCache(store)  # unbounded while it fills
    root = cache.root
    running, old = (
        stored_checkpoint(store, tmp_path, "job_run"),
        stored_checkpoint(store, tmp_path, "job_old"),
    )
    ds_a, ds_b, ds_c = (stored_dataset(store, tmp_path, f"ds_{name}.jsonl") for name in "abc")
    # Not safely in the store: a checkpoint without its manifest that changed moments ago (a rank
    # process that outlived its killed worker may be uploading it still), and a dataset an API
    # process sharing this directory is still sending.
    unuploaded = root / "jobs" / "job_dead" / "checkpoints" / "step-000006"
    unuploaded.mkdir(parents=True)
    (root / "datasets").mkdir()
    in_flight = root / "datasets" / "ds_sending.jsonl"
    in_flight.write_bytes(b"y" * 800)
    aged(in_flight, 60)
    # A dataset its owner deleted from the store hours ago: nothing needs this copy.
    deleted = root / "datasets" / "ds_deleted.jsonl"
    deleted.write_bytes(b"z" * 600)
    aged(deleted, 2 * 3600)

    cache.fetch_dir(running)  # used least recently of the stored ones ...
    cache.fetch_file(ds_a)
    cache.fetch_file(ds_b)
    cache.fetch_dir(old)
    cache.fetch_file(ds_a)  # ... and ds_a most recently: a use of a cached copy counts
    assert (root / running / MANIFEST).is_file() and (root / ds_b).is_file()

    with cache.in_use([root / "jobs" / "job_run"]):  # a running job's directory
        cache.limit_bytes = disk_bytes(root)  # full: the next fetch needs room
        cache.fetch_file(ds_c)
        assert not deleted.exists() and not (root / ds_b).exists()  # the two least recently used
        assert disk_bytes(root) <= cache.limit_bytes
        kept = [running, old, ds_a, ds_c]
        assert all((root / key).exists() for key in kept) and unuploaded.is_dir() and in_flight.is_file()

        assert cache.fetch_file(ds_b).read_bytes() == b"x" * 1000  # evicted here, still in the store
        assert not (root / old).exists()  # next in line; the running job's older one stays
        assert (root / running / "model.safetensors").is_file()

    cache.limit_bytes = 0  # the job has ended: everything safely stored may go now
    evicted = cache.make_room()
    assert [path.relative_to(root).as_posix() for path in evicted] == [running, ds_a, ds_c, ds_b]
    assert unuploaded.is_dir() and in_flight.is_file()
    assert not (root / "jobs" / "job_run" / "checkpoints" / "step-000002").exists()
    assert cache.fetch_dir(running) == root / running  # and comes back from the store


def aged_tree(path: Path, seconds: float) -> Path:
    """``path`` and everything under it last changed ``seconds`` ago."""
    then = time.time() - seconds
    for inner in [*path.rglob("*"), path]:
        os.utime(inner, (then, then), follow_symlinks=False)
    return path


def leftovers(job_dir: Path) -> tuple[Path, Path]:
    """What runs of a job left under its ``checkpoints/`` on a machine it never came back to: a
    complete checkpoint whose upload died with its worker (no manifest), and a write that died."""
    unuploaded = job_dir / "checkpoints" / "step-000004"
    (unuploaded / "trainer_state").mkdir(parents=True)
    (unuploaded / "model.safetensors").write_bytes(b"w" * 1500)
    (unuploaded / "trainer_state" / "state.json").write_text('{"step": 4}')
    partial = job_dir / "checkpoints" / ".tmp-xyz"
    (partial / "trainer_state").mkdir(parents=True)
    (partial / "trainer_state" / "optimizer.pt").write_bytes(b"o" * 700)
    return unuploaded, partial


PAST_GRACE = LEFTOVER_GRACE_S + 3600  # unchanged this long: no process's write or upload


def test_leftovers_of_a_job_run_are_freed_before_any_stored_artifact(
    store: ArtifactStore, tmp_path: Path
) -> None:
    layout = Settings(data_dir=tmp_path, artifact_dir=store.cache)
    cache = StoreCache(store)  # unbounded while it fills
    root = cache.root
    older, newer = (stored_checkpoint(store, tmp_path, job) for job in ("job_older", "job_newer"))
    cache.fetch_dir(older)
    aged(root / older, 3 * PAST_GRACE)  # used less recently than the leftovers last changed
    cache.fetch_dir(newer)  # used just now
    unuploaded, partial = leftovers(layout.job_dir("job_gone"))
    aged_tree(unuploaded, 2 * PAST_GRACE)
    aged_tree(partial, PAST_GRACE)
    # a write that changed moments ago, in a directory no process pins: a rank process that
    # outlived its killed worker (and the worker's pin) may still be writing it
    recent = layout.job_dir("job_orphaned") / "checkpoints" / ".tmp-step-000006"
    recent.mkdir(parents=True)
    (recent / "model.safetensors").write_bytes(b"r" * 900)

    cache.limit_bytes = disk_bytes(root) - disk_bytes(unuploaded) - disk_bytes(partial)
    assert cache.make_room() == [unuploaded, partial]  # the longest unchanged first; both needed
    assert not unuploaded.exists() and not partial.exists()
    assert (root / older / MANIFEST).is_file() and (root / newer / MANIFEST).is_file()
    assert unuploaded.parent.is_dir() and (recent / "model.safetensors").is_file()
    assert disk_bytes(root) <= cache.limit_bytes

    cache.limit_bytes = 0  # the stored ones were evictable all along, least recently used first
    assert cache.make_room() == [root / older, root / newer]
    assert (recent / "model.safetensors").is_file()


def test_leftovers_in_a_job_directory_in_use_are_kept(store: ArtifactStore, tmp_path: Path) -> None:
    layout = Settings(data_dir=tmp_path, artifact_dir=store.cache)
    cache = StoreCache(store)
    root = cache.root
    other = stored_checkpoint(store, tmp_path, "job_other")
    cache.fetch_dir(other)
    job_dir = layout.job_dir("job_running")
    unuploaded, partial = leftovers(job_dir)
    aged_tree(unuploaded, 2 * PAST_GRACE)
    aged_tree(partial, PAST_GRACE)
    with cache.in_use([job_dir]):  # a run of the job, here: its restore_checkpoints decides on them
        cache.limit_bytes = 0
        assert cache.make_room() == [root / other]  # over its bound: what may go went
        assert (unuploaded / "model.safetensors").is_file() and (partial / "trainer_state").is_dir()
    assert cache.make_room() == [unuploaded, partial]  # the pin released


def test_freeing_leftovers_touches_nothing_else(store: ArtifactStore, tmp_path: Path) -> None:
    layout = Settings(data_dir=tmp_path, artifact_dir=store.cache)
    cache = StoreCache(store, limit_bytes=0)  # everything that may go goes
    root = cache.root
    job_dir = layout.job_dir("job_gone")
    unuploaded, partial = leftovers(job_dir)
    outside = tmp_path / "elsewhere" / "model"  # a link's target: never followed
    outside.mkdir(parents=True)
    (job_dir / "checkpoints" / "step-000005").symlink_to(outside)
    kept = [
        job_dir / METRICS_FILE,  # run logs
        job_dir / TENSORBOARD_DIR / "events.out.tfevents.1.host",
        job_dir / ".rank0-outcome.json",
        job_dir / "checkpoints" / "notes.txt",  # a file, not a checkpoint's directory
        merged_dir(job_dir, 4) / "model.safetensors",  # merged models, even without the manifest
        job_dir / "merged" / ".tmp-step-000004-123" / "model.safetensors",
        root / SERVING_CACHE / "jobs" / "job_gone" / "checkpoints" / "step-000004" / "model.safetensors",
        root
        / SERVING_CACHE
        / "jobs"
        / "job_gone"
        / "checkpoints"
        / ".fetch-step-000004-0a1b2c3d"
        / "config.json",
        layout.datasets_dir / ".fetch-ds_1.jsonl-0a1b2c3d",  # a dataset's fetch
        root / ".cache" / "jobs" / "job_gone" / "checkpoints" / ".tmp-step-000004" / "model.safetensors",
        outside / "model.safetensors",
    ]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"k" * 300)
    for tree in (root, outside):
        aged_tree(tree, PAST_GRACE)
    aged_tree(unuploaded, 2 * PAST_GRACE)

    assert cache.make_room() == [unuploaded, partial]
    assert all(path.read_bytes() == b"k" * 300 for path in kept)
    assert (job_dir / "checkpoints" / "step-000005").is_symlink()


def test_a_pin_held_by_another_process_protects_until_that_process_dies(
    store: ArtifactStore, s3_server: S3Server, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, artifact_dir=store.cache, **s3_server.settings())
    cache = StoreCache(store)
    key = stored_checkpoint(store, tmp_path, "job_x")
    cache.fetch_dir(key)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from jobs.settings import get_settings; from jobs.store import open_store; "
            "from jobs.cache import open_cache; s = get_settings(); "
            "pin = open_cache(s, open_store(s)).in_use([s.job_dir('job_x')]); pin.__enter__(); "
            "print('pinned', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        env=settings_env(settings),
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"pinned\n"
        cache.limit_bytes = 0
        assert cache.make_room() == [] and (store.cache / key / MANIFEST).is_file()
    finally:
        holder.kill()
        holder.wait()
    assert cache.make_room() == [store.cache / key]  # its pin lapsed with it
    assert list((store.cache / ".cache" / "pins").iterdir()) == []  # and was swept


class HeldProxy(TcpProxy):
    """A proxy to the store that holds every connection, unanswered, until ``release`` is set: a
    store look-up that hangs, as an unreachable store's do for a minute of boto3's retries."""

    def __init__(self, target_port: int):
        self.holding, self.release = threading.Event(), threading.Event()
        super().__init__(target_port)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        self.holding.set()
        self.release.wait(timeout=300)  # a hang guard: the test releases it
        super()._pump(a, b)


def test_the_store_is_asked_without_the_lock_and_what_was_taken_in_use_meanwhile_is_kept(
    store: ArtifactStore, s3_server: S3Server, tmp_path: Path
) -> None:
    keys = [stored_dataset(store, tmp_path, f"ds_{name}.jsonl") for name in "abc"]
    for key in keys:
        StoreCache(store).fetch_file(key)  # least recently used first: a, then b, then c
    store_port = urlsplit(s3_server.endpoint).port
    assert store_port is not None
    proxy = HeldProxy(store_port)
    through_proxy = {**s3_server.settings(store.prefix), "s3_endpoint_url": f"http://127.0.0.1:{proxy.port}"}
    held = open_store(Settings(data_dir=tmp_path, artifact_dir=store.cache, **through_proxy))
    assert held is not None and (held.cache, held.prefix) == (store.cache, store.prefix)
    cache = StoreCache(held, limit_bytes=0)  # everything safely stored goes
    a, b, c = (cache.root / key for key in keys)

    pinned, unpin = threading.Event(), threading.Event()

    def take_in_use() -> None:  # a chat request or a job start, while the evictor waits on the store
        with StoreCache(store).in_use([a]):
            pinned.set()
            unpin.wait(timeout=300)

    with ThreadPoolExecutor(2) as threads:
        try:
            evicting = threads.submit(cache.make_room)
            assert proxy.holding.wait(timeout=60), "make_room never asked the store"
            taking = threads.submit(take_in_use)
            assert pinned.wait(timeout=60), "in_use waited for the store's look-up"
            assert not evicting.done()  # the look-up is still unanswered
            mark_used(b)  # and b is used meanwhile (fetched again): no longer the least recently used
            proxy.release.set()
            # the store holds all three at their size, but only c is still as it was looked up
            assert evicting.result(timeout=120) == [c]
            assert a.is_file() and b.is_file() and not c.exists()
        finally:
            proxy.release.set()
            unpin.set()
        taking.result(timeout=60)
        proxy.close()
    assert StoreCache(store, limit_bytes=0).make_room() == [a, b]  # no longer in use, least recently used


def test_an_inference_worker_holds_the_job_it_answers_and_evicts_others(
    store: ArtifactStore, s3_server: S3Server, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path, artifact_dir=store.cache, store_cache_gib=1 / (1 << 30), **s3_server.settings()
    )
    cache = open_cache(settings, store)
    assert cache.limit_bytes == 1
    serving = store.cache / SERVING_CACHE
    answered, other = stored_checkpoint(store, tmp_path, "job_a"), stored_checkpoint(store, tmp_path, "job_b")
    cache.fetch_dir(other, into=serving)
    with serving_files_in_use({"job_id": "job_a", "step": 2}, settings):
        cache.fetch_dir(answered, into=serving)
        assert (serving / answered / "model.safetensors").is_file()  # fetched, and kept to be loaded
        assert not (serving / other).exists()  # evicted to make room for it
        assert cache.make_room() == [] and (serving / answered / MANIFEST).is_file()  # over, but in use
    cache.make_room()
    assert not (serving / answered).exists()


def test_an_api_process_keeps_its_datasets_under_the_bound_and_fetches_them_back(
    settings: Settings, s3_server: S3Server, tiny_model: Path
) -> None:
    """An API-only machine: what it received (an upload) and what it read (a dry run's estimate)
    stays under GRPO_STORE_CACHE_GIB, and a dataset evicted there is fetched back when read."""
    api = settings.model_copy(update={**s3_server.settings(), "store_cache_gib": 1 / (1 << 30)})  # 1 byte
    store = open_store(api)
    assert store is not None
    with TestClient(create_app(api, send=lambda job_id: None), headers=bearer(api_key(api))) as client:
        first = upload(client).json()["id"]
        local = api.dataset_path(first)
        assert store.size(store.key_of(local)) and not local.exists()  # in the store; the copy evicted
        estimate = client.post("/v1/jobs", params={"dry_run": "true"}, json=job_spec(first, str(tiny_model)))
        assert estimate.status_code == 200, estimate.text
        assert estimate.json()["tokens"]["prompts_sampled"] > 0  # the dataset was read: fetched back
        assert local.is_file()
        second = upload(client).json()["id"]
        assert not local.exists() and not api.dataset_path(second).exists()  # both under the bound again
    assert disk_bytes(api.artifact_dir) == 0


def test_without_a_store_nothing_is_ever_evicted(tmp_path: Path) -> None:
    """The embedded default: the artifact directory is the storage, whatever the bound says."""
    settings = Settings(data_dir=tmp_path, store_cache_gib=1 / (1 << 30))  # one byte
    assert open_store(settings) is None
    dataset = settings.dataset_path("ds_1")
    dataset.parent.mkdir(parents=True)
    dataset.write_bytes(b"x" * 1000)
    checkpoint = settings.job_dir("job_2") / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"w" * 1000)
    (checkpoint / MANIFEST).write_text("{}")  # even a directory that looks like a stored one
    for path in (dataset, checkpoint):
        aged(path, 30 * 86400)

    with job_files_in_use(job_id="job_1", spec={"dataset_id": "ds_9"}, settings=settings, store=None):
        pass
    with serving_files_in_use({"job_id": "job_2", "step": 2}, settings):
        pass
    assert dataset.read_bytes() == b"x" * 1000 and (checkpoint / "model.safetensors").is_file()
    assert not (settings.artifact_dir / ".cache").exists()  # no cache state was ever made


@pytest.fixture(scope="module")
def shared(redis_worker_settings: Settings, s3_server: S3Server) -> Settings:
    # a one-byte cache: after each run, and before each fetch, everything not in use goes
    return redis_worker_settings.model_copy(update={**s3_server.settings(), "store_cache_gib": 1 / (1 << 30)})


@pytest.fixture(scope="module")
def worker(shared: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    directory = tmp_path_factory.mktemp("cache-worker")
    own = shared.model_copy(update={"data_dir": directory, "artifact_dir": directory / "artifacts"})
    worker = WorkerProcess(own, concurrency=2).start()  # two slots: see test_pause_and_failures_e2e
    yield worker
    worker.stop()
    worker.forget_broker_keys()


@pytest.mark.slow
def test_a_job_whose_checkpoint_was_evicted_resumes_from_the_store(
    shared: Settings, worker: WorkerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    api = shared.model_copy(update={"data_dir": tmp_path, "artifact_dir": tmp_path / "artifacts"})
    with TestClient(create_app(api), headers=bearer(api_key(api))) as client:
        dataset_id = upload(client).json()["id"]
        spec = job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 12, "checkpoint_every": 0})
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        wait_for_step(client, job_id, 2)
        client.post(f"/v1/jobs/{job_id}/pause")
        reached = wait_for_status(client, job_id, "paused")["step"]
        assert reached < 12
        checkpoints = [c["step"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]]
        assert checkpoints == [reached]

        # the run's end brought the worker's cache under its bound: the checkpoint and the dataset
        # are only in the store now
        artifacts, name = worker.settings.artifact_dir, f"step-{reached:06d}"
        assert artifacts is not None
        assert not (artifacts / "jobs" / job_id / "checkpoints" / name).exists(), worker.log()[-3000:]
        assert not (artifacts / "datasets" / f"{dataset_id}.jsonl").exists()
        assert f"evicted {artifacts / 'jobs' / job_id / 'checkpoints' / name}" in worker.log()

        client.post(f"/v1/jobs/{job_id}/resume")
        job = wait_until_ended(client, job_id)
        assert (job["status"], job["step"]) == ("succeeded", 12), (job, worker.log()[-3000:])
        assert status_changes(client, job_id) == [
            "queued",
            "running",
            "paused",
            "queued",
            "running",
            "succeeded",
        ]
        assert metric_steps(client, job_id) == list(range(1, 13))
        events = [
            e["message"]
            for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        ]
        assert f"resuming after step {reached} of 12" in events
        assert f"fetched jobs/{job_id}/checkpoints/{name} from the artifact store" in worker.log()
