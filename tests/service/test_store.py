"""The artifact store (jobs/store.py) against a real S3 server (SeaweedFS): streamed transfers in
parts, listing, deletion, presigned URLs, and directories that count only once complete."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr, ValidationError

from api.errors import STORE_RETRY_AFTER_S, headers_of, status_of
from api.streaming import tar_stream
from jobs.artifacts import stored_files
from jobs.settings import Settings
from jobs.store import CHUNK, MANIFEST, PART_BYTES, ArtifactStore, StoreUnavailable, check_key, open_store
from tests.service.factories import free_port
from tests.service.s3 import S3Server
from worker.artifacts import restore_checkpoints


@pytest.fixture
def store(s3_server: S3Server, tmp_path: Path) -> ArtifactStore:
    """A store under a prefix of its own, with ``tmp_path/cache`` as its local cache."""
    settings = Settings(data_dir=tmp_path, artifact_dir=tmp_path / "cache", **s3_server.settings())
    store = open_store(settings)
    assert store is not None
    return store


def write_checkpoint(directory: Path, weights: bytes = b"w" * 3000) -> Path:
    (directory / "trainer_state").mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(weights)
    (directory / "trainer_state" / "state.json").write_text('{"step": 2}')
    return directory


def test_a_20_mb_file_goes_up_in_parts_and_comes_back_streamed(
    store: ArtifactStore, s3_server: S3Server, tmp_path: Path
) -> None:
    data = os.urandom(20 << 20)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    store.upload_file(source, "datasets/big.bin")

    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=f"{store.prefix}/datasets/big.bin")
    parts = -(-len(data) // PART_BYTES)
    assert parts > 1 and head["ETag"].strip('"').endswith(f"-{parts}")  # a multipart upload's ETag
    assert head["ContentLength"] == len(data) and store.size("datasets/big.bin") == len(data)

    chunks = list(store.read("datasets/big.bin", size=len(data)))
    assert len(chunks) >= len(data) // CHUNK and max(map(len, chunks)) <= CHUNK
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(data).digest()

    copy = tmp_path / "copy" / "big.bin"
    store.download_file("datasets/big.bin", copy)
    assert copy.read_bytes() == data and [p.name for p in copy.parent.iterdir()] == ["big.bin"]
    with pytest.raises(OSError, match="larger than its manifest"):
        list(store.read("datasets/big.bin", size=len(data) - 1))


def test_listing_and_deleting_a_prefix(store: ArtifactStore, tmp_path: Path) -> None:
    for name, size in [("a/x.txt", 3), ("a/b/y.txt", 5), ("ab/z.txt", 7)]:
        (tmp_path / "f").write_bytes(b"." * size)
        store.upload_file(tmp_path / "f", name)
    assert [(o.key, o.size) for o in store.list("a")] == [("a/b/y.txt", 5), ("a/x.txt", 3)]  # not ab/

    assert store.delete("a") == 2
    assert store.list("a") == [] and store.size("a/x.txt") is None
    assert [o.key for o in store.list("ab")] == ["ab/z.txt"]  # a sibling with the same start stays
    with pytest.raises(FileNotFoundError):
        store.download_file("a/x.txt", tmp_path / "gone.txt")


def test_a_presigned_url_gets_the_object_without_credentials(store: ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_bytes(b'{"prompt": "hi"}\n')
    store.upload_file(tmp_path / "data.jsonl", "datasets/ds_1.jsonl")

    url = store.presign("datasets/ds_1.jsonl", filename="my data.jsonl", expires_s=60)
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b'{"prompt": "hi"}\n'
    assert response.headers["content-disposition"] == "attachment; filename*=utf-8''my%20data.jsonl"
    assert httpx.get(url.split("?")[0]).status_code == 403  # the same object, unsigned
    assert httpx.get(url.replace("ds_1", "ds_2")).status_code == 403  # the signature covers the key


def test_a_directory_counts_only_once_its_manifest_is_uploaded(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = "jobs/job_1/checkpoints"
    checkpoint = write_checkpoint(tmp_path / "step-000002")
    uploaded: list[str] = []
    real_upload = store.upload_file

    def dies_after_two_files(path: Path, key: str) -> None:
        if len(uploaded) == 2:
            raise KeyboardInterrupt  # the worker killed mid-upload
        real_upload(path, key)
        uploaded.append(key)

    monkeypatch.setattr(store, "upload_file", dies_after_two_files)
    with pytest.raises(KeyboardInterrupt):
        store.upload_dir(checkpoint, f"{root}/step-000002")
    monkeypatch.undo()

    assert len(store.list(f"{root}/step-000002")) == 2  # its files are there ...
    assert store.complete_dirs(root) == []  # ... but it is not a checkpoint
    assert store.manifest(f"{root}/step-000002") is None
    assert stored_files(store, f"{root}/step-000002") is None
    assert store.fetch_dir(f"{root}/step-000002") is None

    manifest = store.upload_dir(checkpoint, f"{root}/step-000002")
    store.upload_dir(write_checkpoint(tmp_path / "step-000004"), f"{root}/step-000004")
    assert store.complete_dirs(root) == ["step-000002", "step-000004"]
    assert manifest.files == {"config.json": 23, "model.safetensors": 3000, "trainer_state/state.json": 11}
    files = stored_files(store, f"{root}/step-000002")
    assert files is not None and [(f.name, f.size) for f in files] == [
        ("config.json", 23),
        ("model.safetensors", 3000),
    ]
    assert b"".join(files[1].chunks()) == b"w" * 3000

    store.delete_dir(f"{root}/step-000002")
    assert store.complete_dirs(root) == ["step-000004"] and store.list(f"{root}/step-000002") == []


def test_a_directory_uploaded_again_replaces_the_old_version_in_store_and_cache(
    store: ArtifactStore, tmp_path: Path
) -> None:
    key = "jobs/job_2/checkpoints/step-000002"
    first = write_checkpoint(tmp_path / "a" / "step-000002")
    (first / "extra.bin").write_bytes(b"old")
    store.upload_dir(first, key)
    cached = store.fetch_dir(key)
    assert cached == store.cache_path(key) and (cached / "extra.bin").read_bytes() == b"old"

    replay = write_checkpoint(tmp_path / "b" / "step-000002", weights=b"v" * 10)
    second = store.upload_dir(replay, key)
    assert [o.key.rsplit("/", 1)[-1] for o in store.list(key) if "extra" in o.key] == []  # no old file left
    cached = store.fetch_dir(key)
    assert cached is not None and (cached / "model.safetensors").read_bytes() == b"v" * 10
    assert not (cached / "extra.bin").exists() and MANIFEST in os.listdir(cached)
    assert sorted(p.name for p in cached.parent.iterdir()) == ["step-000002"]  # no download left behind

    serving = store.fetch_dir(
        key, skip=lambda name: name.startswith("trainer_state/"), into=tmp_path / "serve"
    )
    assert serving == tmp_path / "serve" / key and not (serving / "trainer_state").exists()
    assert store.manifest(key) == second


def test_an_unreachable_store_is_told_apart_from_a_refusal(
    store: ArtifactStore, s3_server: S3Server, tmp_path: Path
) -> None:
    import boto3
    from botocore.config import Config

    down = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        aws_access_key_id="k",
        aws_secret_access_key="s",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),
    )
    unreachable = ArtifactStore(client=down, bucket="b", prefix="p", cache=tmp_path)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        unreachable.manifest("jobs/x/checkpoints/step-000001")

    settings = Settings(
        data_dir=tmp_path, **{**s3_server.settings(), "s3_secret_access_key": SecretStr("wrong")}
    )
    refused = open_store(settings)
    assert refused is not None
    with pytest.raises(ClientError) as refusal:
        refused.list("jobs")
    assert not isinstance(refusal.value, StoreUnavailable)


def test_store_settings_and_keys_are_checked() -> None:
    assert open_store(Settings()) is None  # the embedded default: no store
    for url in ("http://bucket/prefix", "s3://", "bucket"):
        with pytest.raises(ValidationError, match="GRPO_STORE_URL"):
            Settings(store_url=url)
    assert Settings(store_url="").store_url is None  # compose passes an unset variable as ""
    for key in ("../x", "/etc/passwd", "a/../../b", "a//b", ""):
        with pytest.raises(ValueError):
            check_key(key)


def test_a_resumed_jobs_checkpoints_are_laid_out_as_the_record_says(
    store: ArtifactStore, tmp_path: Path
) -> None:
    """Before a run: the newest recorded checkpoint whole and of the stored version, older recorded
    ones at least as placeholders with their step state (the trainer prunes them), nothing else."""
    job_dir = store.cache / "jobs" / "job_3"
    elsewhere = tmp_path / "other-machine" / "checkpoints"
    keys = {step: f"jobs/job_3/checkpoints/step-{step:06d}" for step in (2, 4, 6)}
    for step, key in keys.items():  # written and uploaded by another machine
        store.upload_dir(write_checkpoint(elsewhere / f"step-{step:06d}", weights=bytes([step]) * 100), key)
    local = job_dir / "checkpoints"
    write_checkpoint(local / "step-000006", weights=b"stale")  # this machine's earlier attempt: replaced
    write_checkpoint(local / "step-000008")  # written here, its upload never completed: not recorded
    (local / ".tmp-step-000010").mkdir()

    resume = restore_checkpoints(job_dir=job_dir, recorded={2: keys[2], 4: keys[4], 6: keys[6]}, store=store)

    assert resume == 6
    assert sorted(p.name for p in local.iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert (local / "step-000006" / "model.safetensors").read_bytes() == bytes([6]) * 100
    for older in ("step-000002", "step-000004"):
        assert sorted(
            p.relative_to(local / older).as_posix() for p in (local / older).rglob("*") if p.is_file()
        ) == [
            MANIFEST,
            "trainer_state/state.json",
        ]
    assert restore_checkpoints(job_dir=job_dir, recorded={}, store=store) is None
    assert list(local.iterdir()) == []  # nothing recorded: a fresh start


def test_an_unreachable_store_is_a_503_in_the_api() -> None:
    """(Through the API, with nothing listening at the store's address: test_download_head.py.)"""
    unreachable = StoreUnavailable("the artifact store at http://127.0.0.1:1 could not be reached")
    assert status_of(unreachable) == 503
    assert headers_of(unreachable) == {"Retry-After": str(STORE_RETRY_AFTER_S)}


def test_a_stored_checkpoint_pruned_while_it_downloads_still_comes_whole(
    store: ArtifactStore, tmp_path: Path
) -> None:
    key = "jobs/job_p/checkpoints/step-000002"
    weights = os.urandom(3 * CHUNK + 5)
    store.upload_dir(write_checkpoint(tmp_path / "step-000002", weights), key)

    with ExitStack() as handles:
        files = stored_files(store, key, handles)  # every object opened before a response starts
        assert files is not None
        stream = tar_stream(files, "ckpt")
        body = [next(stream)]
        store.delete_dir(key)  # the worker prunes it (keep_last_checkpoints)
        assert store.manifest(key) is None and store.list(key) == []
        body += list(stream)
    with tarfile.open(fileobj=io.BytesIO(b"".join(body))) as archive:
        assert {m.name: m.size for m in archive.getmembers()} == {
            "ckpt/config.json": 23,
            "ckpt/model.safetensors": len(weights),
        }
        assert archive.extractfile("ckpt/model.safetensors").read() == weights

    # Deleted between its manifest and its objects being opened: not found, before any response.
    store.upload_dir(write_checkpoint(tmp_path / "again", weights), key)
    store.delete(f"{key}/model.safetensors")
    with ExitStack() as handles, pytest.raises(FileNotFoundError, match="model.safetensors"):
        stored_files(store, key, handles)
