"""The artifact store: datasets, checkpoints and merged models in an S3-compatible bucket that API
processes and workers on any number of machines share (``GRPO_STORE_URL``), spoken to with boto3.

Keys mirror the artifact directory: what a process keeps at ``<artifact_dir>/<key>`` the store
keeps at ``<prefix>/<key>``, so each process's ``artifact_dir`` is its local cache of the store and
a stored path (a checkpoint row's ``path``) names both. Unset, there is no store and
``artifact_dir`` alone holds everything, as in the embedded default.

A file is one object, and S3 makes an object visible only once its upload is complete (a multipart
upload too, at its CompleteMultipartUpload). A directory (a checkpoint, a merged model) is many
objects, so it counts only once complete: its files are uploaded first and its manifest
(``MANIFEST``: every file's name and size, and a version) last. One without a manifest is never
listed, downloaded or resumed from, and removing a directory deletes its manifest first. (The worker
also records a checkpoint's row only after the upload, so the API, which lists rows, never offers
one in flight; the manifest is what keeps the store right on its own: a worker killed mid-upload
leaves objects that nothing takes for a checkpoint, and the tar a download streams is built from the
manifest's list, not from whatever objects are there.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from jobs.errors import ServiceError
from jobs.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = ".grpo-manifest.json"  # a directory's last object: it is complete
CHUNK = 1 << 20  # a streamed read's piece
# Files past this size go up and down in parts of this size, several at once (boto3's transfer
# manager): a checkpoint's multi-gigabyte weights never sit whole in memory, and a failed part is
# sent again alone. S3 allows 10,000 parts an object: 160 GB.
PART_BYTES = 16 << 20
TRANSFER_THREADS = 4
DELETE_BATCH = 1000  # S3's limit of keys per DeleteObjects call


class StoreUnavailable(ServiceError):
    """The object store could not be reached (after boto3's own retries), or answered with a
    server error: the work may succeed later, unlike a refusal (bad credentials, no bucket). The
    API answers it 503; the worker gives the job back to be re-queued."""

    code = "store_unavailable"


@dataclass(frozen=True)
class Manifest:
    """A complete directory in the store: each file (its path inside the directory) and its
    size, and a version that changes each time the directory is uploaded again."""

    version: str
    files: dict[str, int]
    created: float = 0.0  # when it was uploaded (seconds since the epoch): the files' time in a tar

    def to_bytes(self) -> bytes:
        return json.dumps({"version": self.version, "created": self.created, "files": self.files}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        parsed = json.loads(data)
        return cls(
            version=str(parsed["version"]),
            files={str(k): int(v) for k, v in parsed["files"].items()},
            created=float(parsed.get("created") or 0.0),
        )


@dataclass(frozen=True)
class StoredObject:
    key: str  # under the store's prefix, as the artifact directory names it
    size: int


def check_key(key: str) -> str:
    """``key`` if it is a plain relative path (no ``..``, no leading slash): a stored path read
    back from the database never reaches outside the store's prefix."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts or key != path.as_posix():
        raise ValueError(f"{key!r} is not a relative artifact path")
    return key


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps: boto3's transfers re-raise) is the store being out of
    reach or failing on its side, rather than refusing the request."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BotoConnectionError | HTTPClientError):
            return True
        if isinstance(seen, ClientError):
            return int(seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def _calling(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if _unreachable(exc):
            raise StoreUnavailable(
                f"the artifact store is unreachable ({what}: {type(exc).__name__})"
            ) from exc
        raise


def _is_missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class ArtifactStore:
    """One bucket and prefix, and this process's cache of it (``cache``, the artifact directory)."""

    def __init__(self, *, client: Any, bucket: str, prefix: str, cache: Path, signer: Any | None = None):
        self.client, self.bucket, self.prefix, self.cache = client, bucket, prefix.strip("/"), cache
        self.signer = signer or client  # presigns GETs: a client for the endpoint downloaders reach
        from boto3.s3.transfer import TransferConfig

        self.transfer = TransferConfig(
            multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=TRANSFER_THREADS
        )

    # keys

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def key_of(self, path: Path) -> str:
        """The key of a file or directory in the cache (``ValueError`` for one outside it)."""
        return path.resolve().relative_to(self.cache.resolve()).as_posix()

    def cache_path(self, key: str) -> Path:
        return self.cache / check_key(key)

    # files

    def upload_file(self, path: Path, key: str) -> None:
        """Stream ``path`` up (in parts past PART_BYTES); the object appears once it is whole."""
        with _calling(f"upload of {key}"):
            self.client.upload_file(str(path), self.bucket, self._full(key), Config=self.transfer)

    def download_file(self, key: str, path: Path) -> None:
        """Stream object ``key`` down to ``path``, written under a temporary name and renamed, so
        a cache never holds half a file. ``FileNotFoundError`` if there is no such object."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.parent / f".fetch-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            with _calling(f"download of {key}"):
                self.client.download_file(self.bucket, self._full(key), str(partial), Config=self.transfer)
            os.replace(partial, path)
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"no object {key!r} in the artifact store") from exc
            raise
        finally:
            partial.unlink(missing_ok=True)

    def fetch_file(self, key: str) -> Path:
        """The cached copy of object ``key``, downloaded first if this cache has none (for
        objects never rewritten under the same key: datasets)."""
        path = self.cache_path(key)
        if not path.is_file():
            self.download_file(key, path)
        return path

    def read(self, key: str, *, size: int | None = None) -> Iterator[bytes]:
        """Object ``key``'s bytes, a CHUNK at a time as they arrive. With ``size``, an object of
        another size is an ``OSError`` (a tar stream has already announced it)."""
        with _calling(f"read of {key}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        try:
            sent = 0
            with _calling(f"read of {key}"):
                for chunk in body.iter_chunks(CHUNK):
                    sent += len(chunk)
                    if size is not None and sent > size:
                        raise OSError(f"{key} in the artifact store is larger than its manifest says")
                    yield chunk
            if size is not None and sent != size:
                raise OSError(f"{key} in the artifact store is smaller than its manifest says")
        finally:
            body.close()

    def size(self, key: str) -> int | None:
        """Object ``key``'s size, or None if there is no such object."""
        try:
            with _calling(f"look-up of {key}"):
                return int(self.client.head_object(Bucket=self.bucket, Key=self._full(key))["ContentLength"])
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise

    def list(self, key: str) -> list[StoredObject]:
        """Every object under ``key/``, at any depth, in key order."""
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        with _calling(f"listing of {key}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full(key).rstrip("/") + "/"):
                found += [
                    StoredObject(self._relative(item["Key"]), int(item["Size"]))
                    for item in page.get("Contents", ())
                ]
        return sorted(found, key=lambda item: item.key)

    def delete(self, key: str) -> int:
        """Delete object ``key`` and every object under ``key/``; returns how many there were."""
        keys = [self._full(item.key) for item in self.list(key)]
        if self.size(key) is not None:
            keys.append(self._full(key))
        with _calling(f"deletion of {key}"):
            for start in range(0, len(keys), DELETE_BATCH):
                batch = [{"Key": k} for k in keys[start : start + DELETE_BATCH]]
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise OSError(f"the artifact store kept {first.get('Key')}: {first.get('Message')}")
        return len(keys)

    def presign(self, key: str, *, filename: str, expires_s: int) -> str:
        """A URL that GETs object ``key`` without credentials for ``expires_s`` seconds, saved as
        ``filename`` by a browser."""
        return self.signer.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._full(key),
                "ResponseContentDisposition": content_disposition(filename),
            },
            ExpiresIn=expires_s,
        )

    # directories

    def upload_dir(self, directory: Path, key: str) -> Manifest:
        """Upload every plain file of ``directory`` (links are skipped, as downloads skip them),
        then its manifest, which makes it complete; what ``key`` held before is deleted first, so
        a directory uploaded again never mixes versions. The manifest is written into
        ``directory`` too: this cache's copy is that version."""
        self.delete_dir(key)
        files: dict[str, int] = {}
        for root, dirs, names in os.walk(directory):
            dirs.sort()
            for name in sorted(names):
                path = Path(root) / name
                relative = path.relative_to(directory).as_posix()
                if path.is_symlink() or relative == MANIFEST:
                    continue
                self.upload_file(path, f"{key}/{relative}")
                files[relative] = path.stat().st_size
        manifest = Manifest(version=uuid.uuid4().hex, files=files, created=time.time())
        with _calling(f"upload of {key}/{MANIFEST}"):
            self.client.put_object(
                Bucket=self.bucket, Key=self._full(f"{key}/{MANIFEST}"), Body=manifest.to_bytes()
            )
        (directory / MANIFEST).write_bytes(manifest.to_bytes())
        return manifest

    def manifest(self, key: str) -> Manifest | None:
        """The manifest of directory ``key``, or None while it is not complete in the store."""
        try:
            with _calling(f"read of {key}/{MANIFEST}"):
                body = self.client.get_object(Bucket=self.bucket, Key=self._full(f"{key}/{MANIFEST}"))["Body"]
                with body:
                    return Manifest.from_bytes(body.read())
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise

    def complete_dirs(self, key: str) -> list[str]:
        """The names of the complete directories directly under ``key`` (those with a manifest)."""
        suffix = f"/{MANIFEST}"
        names = []
        for item in self.list(key):
            inner = item.key[len(key.rstrip("/")) + 1 :]
            if inner.endswith(suffix) and "/" not in inner[: -len(suffix)]:
                names.append(inner[: -len(suffix)])
        return sorted(names)

    def delete_dir(self, key: str) -> None:
        """Delete directory ``key``: its manifest first, so that from the first deletion on it is
        no longer complete."""
        with _calling(f"deletion of {key}/{MANIFEST}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(f"{key}/{MANIFEST}"))
        self.delete(key)

    def fetch_dir(
        self, key: str, *, skip: Callable[[str], bool] = lambda name: False, into: Path | None = None
    ) -> Path | None:
        """The cached copy of complete directory ``key`` (under ``into``, else the cache), brought
        up to the store's version first (its files but those ``skip`` names); None if the store
        has no complete directory there.

        The copy is downloaded beside the cached one and renamed over it, so a reader of the cache
        sees one version whole or none."""
        manifest = self.manifest(key)
        if manifest is None:
            return None
        target = (into or self.cache) / check_key(key)
        wanted = {name: size for name, size in manifest.files.items() if not skip(name)}
        if is_current(target, manifest, wanted):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.parent / f".fetch-{target.name}-{uuid.uuid4().hex[:8]}"
        try:
            for name, size in wanted.items():
                path = partial / name
                path.parent.mkdir(parents=True, exist_ok=True)
                self.download_file(f"{key}/{name}", path)
                if path.stat().st_size != size:
                    raise OSError(f"{key}/{name} in the artifact store is not the size its manifest says")
            (partial / MANIFEST).write_bytes(manifest.to_bytes())
            shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(partial, target)
            except OSError:  # another process of this cache renamed its copy first
                if not is_current(target, manifest, wanted):
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        log.info("fetched %s from the artifact store (%d files)", key, len(wanted))
        return target


def is_current(directory: Path, manifest: Manifest, wanted: dict[str, int]) -> bool:
    """Whether ``directory`` is a copy of ``manifest``'s version holding the ``wanted`` files."""
    try:
        local = Manifest.from_bytes((directory / MANIFEST).read_bytes())
    except (OSError, ValueError, KeyError):
        return False
    return local.version == manifest.version and all(
        (directory / name).is_file() and (directory / name).stat().st_size == size
        for name, size in wanted.items()
    )


def content_disposition(filename: str) -> str:
    """``attachment`` with ``filename``, in RFC 6266's form for a name that is not plain ASCII
    (as Starlette's FileResponse writes it)."""
    from urllib.parse import quote

    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def split_store_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")``."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def open_store(settings: Settings) -> ArtifactStore | None:
    """The store ``settings`` name, or None when artifacts stay in ``artifact_dir`` alone. One
    client per process and settings (boto3 clients are thread-safe; a forked pool process makes
    its own, as sockets are not shared across a fork)."""
    if not settings.store_url:
        return None
    assert settings.artifact_dir is not None
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    return _open(
        settings.store_url,
        settings.s3_endpoint_url,
        settings.s3_public_endpoint_url,
        settings.s3_access_key_id,
        secret,
        settings.s3_region,
        settings.artifact_dir,
        os.getpid(),
    )


@lru_cache(maxsize=8)
def _open(
    url: str,
    endpoint: str | None,
    public_endpoint: str | None,
    key_id: str | None,
    secret: str | None,
    region: str | None,
    cache: Path,
    pid: int,
) -> ArtifactStore:
    import boto3  # here, not at the top: a process without a store (the embedded default) never loads it
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        # An endpoint of its own (SeaweedFS, MinIO) is addressed by path: no bucket subdomains.
        s3={"addressing_style": "path" if endpoint else "auto"},
        retries={"max_attempts": 6, "mode": "standard"},  # backs off on throttling and 5xx too
        connect_timeout=10,
        read_timeout=120,
    )
    session = boto3.session.Session(
        aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=region
    )
    client = session.client("s3", endpoint_url=endpoint, config=config)
    signer = session.client("s3", endpoint_url=public_endpoint, config=config) if public_endpoint else None
    bucket, prefix = split_store_url(url)
    return ArtifactStore(client=client, bucket=bucket, prefix=prefix, cache=cache, signer=signer)
