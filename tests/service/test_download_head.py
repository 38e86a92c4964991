"""``HEAD`` on the download routes answers as ``GET`` does (status, Content-Length, Content-Type,
Content-Disposition) with no body and without opening a file or object; and a download while the
artifact store is out of reach is a 503 that says when to try again (Retry-After). On PostgreSQL,
real files and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import pytest
from fastapi.testclient import TestClient

from api.errors import STORE_RETRY_AFTER_S
from api.main import create_app
from api.routes.checkpoints import download_files
from jobs.artifacts import merged_dir
from jobs.settings import Settings
from jobs.store import CHUNK, open_store
from tests.service.factories import api_key, bearer, free_port, job_spec, make_checkpoint, upload
from tests.service.s3 import S3Server
from tests.service.test_records_api import _open_fds_under

SAME = ("content-type", "content-length", "content-disposition")


def head_and_get(client: TestClient, url: str, **request) -> tuple:
    """The HEAD and the GET of ``url``, checked to agree: the same status and headers, no body to
    the HEAD, and a GET body of the length both announce."""
    head, get = client.head(url, **request), client.get(url, **request)
    assert head.status_code == get.status_code, (head, get.text)
    assert head.content == b"", head.content[:200]
    for name in SAME:
        assert head.headers.get(name) == get.headers.get(name), (name, head.headers, get.headers)
    if get.status_code == 200:
        assert int(head.headers["content-length"]) == len(get.content)
    return head, get


def tar_names(response) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        return sorted(archive.getnames())


@pytest.fixture
def job_id(client) -> str:
    return client.post("/v1/jobs", json=job_spec(upload(client).json()["id"])).json()["id"]


def test_head_on_a_checkpoint_download_answers_as_get_without_a_body(client, settings, job_id) -> None:
    stored = make_checkpoint(settings, job_id, 2)
    (settings.artifact_dir / stored / "model.safetensors").write_bytes(os.urandom(2 * CHUNK + 7))
    url = f"/v1/jobs/{job_id}/checkpoints/2/download"
    head, get = head_and_get(client, url)
    assert head.status_code == 200 and head.headers["content-type"] == "application/x-tar"
    assert head.headers["content-disposition"] == f'attachment; filename="{job_id}-step-2.tar"'
    assert tar_names(get) == [f"{job_id}-step-2/config.json", f"{job_id}-step-2/model.safetensors"]
    # a name longer than a plain tar header holds: a PAX header of its own, counted too
    long_name = "x" * 150 + ".json"
    (settings.artifact_dir / stored / long_name).write_text("{}")
    head, get = head_and_get(client, url)
    assert f"{job_id}-step-2/{long_name}" in tar_names(get)

    # a LoRA checkpoint, as its adapter and merged
    make_checkpoint(settings, job_id, 3, kind="adapter")
    merged = merged_dir(settings.job_dir(job_id), 3)
    merged.mkdir(parents=True)
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "model.safetensors").write_bytes(b"w" * 700)
    for format in ("adapter", "merged"):
        head, _ = head_and_get(client, f"/v1/jobs/{job_id}/checkpoints/3/download", params={"format": format})
        assert head.status_code == 200, format
    assert "-step-3-merged.tar" in head.headers["content-disposition"]

    # the refusals are GET's: a step with no checkpoint, one pruned, a bad format, another owner's job
    shutil.rmtree(settings.artifact_dir / make_checkpoint(settings, job_id, 4))
    for url, params, status in [
        (f"/v1/jobs/{job_id}/checkpoints/9/download", {}, 404),
        (f"/v1/jobs/{job_id}/checkpoints/4/download", {}, 404),
        (f"/v1/jobs/{job_id}/checkpoints/2/download", {"format": "adapter"}, 422),
        (f"/v1/jobs/{job_id}/checkpoints/x/download", {}, 422),
    ]:
        assert head_and_get(client, url, params=params)[0].status_code == status, url
    bob = bearer(api_key(settings, owner="bob"))
    url = f"/v1/jobs/{job_id}/checkpoints/2/download"
    assert head_and_get(client, url, headers=bob)[0].status_code == 404


def test_a_heads_listing_opens_no_file(settings, client, job_id) -> None:
    stored = make_checkpoint(settings, job_id, 2)
    files = download_files(settings, stored, None)
    assert files is not None and {f.name: f.size for f in files} == {
        "config.json": 23,
        "model.safetensors": 1280,
    }
    assert _open_fds_under(settings.artifact_dir / stored) == []
    assert b"".join(next(f for f in files if f.name == "config.json").chunks()) == b'{"model_type": "llama"}'
    assert _open_fds_under(settings.artifact_dir / stored) == []  # read, and closed once read


def test_head_on_a_local_dataset_download_answers_as_get(client) -> None:
    file_id = upload(client, name="sums.jsonl").json()["id"]
    head, _ = head_and_get(client, f"/v1/files/{file_id}/content")
    assert (
        head.status_code == 200 and head.headers["content-disposition"] == 'attachment; filename="sums.jsonl"'
    )
    assert head_and_get(client, "/v1/files/file_nope/content")[0].status_code == 404


@pytest.fixture
def stored(settings: Settings, s3_server: S3Server) -> Settings:
    """The API's settings with its artifacts in the S3 server, under a prefix of their own."""
    return settings.model_copy(update=s3_server.settings())


def test_head_on_downloads_from_the_store_answers_as_get(stored: Settings) -> None:
    store = open_store(stored)
    assert store is not None
    with TestClient(create_app(stored, send=lambda job_id: None), headers=bearer(api_key(stored))) as client:
        file_id = upload(client, name="sums.jsonl").json()["id"]
        stored.dataset_path(file_id).unlink()  # an API process that did not take the upload: from the store
        head, get = head_and_get(client, f"/v1/files/{file_id}/content")
        assert head.status_code == 200 and get.content.startswith(b'{"prompt"'), get.text[:200]
        assert head.headers["content-disposition"] == 'attachment; filename="sums.jsonl"'

        job_id = client.post("/v1/jobs", json=job_spec(file_id)).json()["id"]
        key = make_checkpoint(stored, job_id, 2)
        store.upload_dir(stored.artifact_dir / key, key)
        shutil.rmtree(stored.artifact_dir / key)  # the API reads it from the store
        head, get = head_and_get(client, f"/v1/jobs/{job_id}/checkpoints/2/download")
        assert head.status_code == 200 and tar_names(get) == [
            f"{job_id}-step-2/config.json",
            f"{job_id}-step-2/model.safetensors",
        ]
        store.delete_dir(key)  # pruned: its manifest gone
        assert head_and_get(client, f"/v1/jobs/{job_id}/checkpoints/2/download")[0].status_code == 404


def test_head_on_a_presigned_file_download_answers_with_its_size_not_a_redirect(stored: Settings) -> None:
    """GET redirects to a URL presigned for GET; S3 signs the method, so the store refuses a HEAD
    there (``curl -I -L`` would end in a 403): HEAD is answered by the API, with the object's size
    and the headers the presigned GET carries, whether this API process took the upload or not."""
    import httpx

    presigning = stored.model_copy(update={"store_presigned_downloads": True})
    with TestClient(
        create_app(presigning, send=lambda job_id: None),
        headers=bearer(api_key(stored)),
        follow_redirects=False,
    ) as client:
        taken_here = upload(client, name="sums.jsonl").json()["id"]
        elsewhere = upload(client, name="other.jsonl").json()["id"]
        stored.dataset_path(elsewhere).unlink()  # uploaded through another API process
        for file_id, name in ((taken_here, "sums.jsonl"), (elsewhere, "other.jsonl")):
            url = f"/v1/files/{file_id}/content"
            get = client.get(url)
            assert get.status_code == 307 and get.headers["location"].startswith(stored.s3_endpoint_url)
            location = get.headers["location"]
            fetched = httpx.get(location)
            assert fetched.status_code == 200 and fetched.content.startswith(b'{"prompt"'), fetched.text
            assert httpx.head(location).status_code == 403  # the URL is GET's alone

            head = client.head(url)
            assert head.status_code == 200 and "location" not in head.headers, head.headers
            assert head.content == b""
            assert int(head.headers["content-length"]) == len(fetched.content)
            assert head.headers["content-type"] == "application/jsonl"
            assert head.headers["content-disposition"] == f'attachment; filename="{name}"'
            assert fetched.headers["content-disposition"] == head.headers["content-disposition"]
        # refusals as GET's: no such file, another owner's
        assert client.head("/v1/files/file_nope/content").status_code == 404
        bob = bearer(api_key(stored, owner="bob"))
        assert client.head(f"/v1/files/{taken_here}/content", headers=bob).status_code == 404


def test_a_download_while_the_store_is_out_of_reach_is_a_503_with_retry_after(
    client, settings: Settings, s3_server: S3Server, job_id: str
) -> None:
    """The store's address with nothing listening there (a stopped server): after boto3's own
    retries, a 503 naming the store, and when to try again."""
    make_checkpoint(settings, job_id, 2)
    down = settings.model_copy(
        update={**s3_server.settings(), "s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}
    )
    with TestClient(create_app(down, send=lambda job_id: None), headers=dict(client.headers)) as other:
        for method in ("GET", "HEAD"):
            response = other.request(method, f"/v1/jobs/{job_id}/checkpoints/2/download")
            assert response.status_code == 503, (method, response.text)
            assert response.headers["retry-after"] == str(STORE_RETRY_AFTER_S) == "5", method
            if method == "GET":
                assert response.json()["error"]["code"] == "store_unavailable"
