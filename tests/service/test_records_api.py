"""Metrics, events (JSON and server-sent) and checkpoints of a job, on PostgreSQL."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.routes.checkpoints import closing, download_files
from api.streaming import tar_stream
from jobs.artifacts import merged_dir
from jobs.db import transaction
from jobs.keys import hash_token
from jobs.models import JobStatus
from jobs.queries import add_event, append_metrics, claim_job, finish_job, get_api_key_by_hash, revoke_api_key
from jobs.store import CHUNK
from tests.service.factories import api_key, bearer, job_spec, make_checkpoint, upload


@pytest.fixture
def job_id(client) -> str:
    dataset_id = upload(client).json()["id"]
    return client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]


def test_metrics_in_step_order_with_incremental_polling(client, settings, job_id) -> None:
    with transaction(settings.database_url) as session:
        for step in (2, 1, 3):
            append_metrics(session=session, job_id=job_id, step=step, metrics={"reward": step / 10})
        append_metrics(session=session, job_id=job_id, step=2, metrics={"reward": 0.9, "kl": float("nan")})
    everything = client.get(f"/v1/jobs/{job_id}/metrics").json()
    assert [(m["step"], m["metrics"]) for m in everything["data"]] == [
        (1, {"reward": 0.1}),
        (2, {"reward": 0.9, "kl": None}),
        (3, {"reward": 0.3}),
    ]
    newer = client.get(f"/v1/jobs/{job_id}/metrics", params={"after_step": 1, "limit": 1}).json()
    assert [m["step"] for m in newer["data"]] == [2] and newer["has_more"] is True
    response = client.get(f"/v1/jobs/{job_id}/metrics", params={"after_step": -1})
    assert response.status_code == 422 and response.json()["error"]["param"] == "after_step"


def test_events_as_json_pages(client, settings, job_id) -> None:
    with transaction(settings.database_url) as session:
        add_event(session=session, job_id=job_id, kind="log", level="warning", message="3 reward errors")
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [(e["kind"], e["level"], e["message"]) for e in events] == [
        ("status", "info", "queued"),
        ("log", "warning", "3 reward errors"),
    ]
    later = client.get(f"/v1/jobs/{job_id}/events", params={"after": events[0]["id"]}).json()["data"]
    assert [e["id"] for e in later] == [events[1]["id"]]


def test_events_as_server_sent_events_end_with_the_job(client, settings, job_id) -> None:
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="w")
        finish_job(
            session=session, job_id=job_id, worker="w", status=JobStatus.failed, reason="out of memory"
        )
    headers = {"accept": "text/event-stream"}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    messages = [block for block in body.split("\n\n") if block.startswith("id:")]
    assert [m.split("\n")[1] for m in messages] == ["event: status"] * 3
    assert "failed: out of memory" in messages[-1]
    second_id = messages[1].split("\n")[0].removeprefix("id: ")
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={**headers, "Last-Event-ID": second_id}
    ) as response:
        resumed = [b for b in response.read().decode().split("\n\n") if b.startswith("id:")]
    assert resumed == messages[2:]


def test_an_event_stream_ends_once_its_key_is_revoked(settings, sent, job_id) -> None:
    """A queued job's stream would run on for good: it stops once the key that opened it is
    revoked (within GRPO_API_KEY_CACHE_S; 0 here), as that key's new requests are refused."""
    secret = api_key(settings)
    quick = settings.model_copy(update={"api_key_cache_s": 0, "event_poll_interval_s": 0.05})
    with TestClient(create_app(quick, send=sent.append), headers=bearer(secret)) as client:
        with client.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("retry:")
            with transaction(settings.database_url) as session:
                key = get_api_key_by_hash(session=session, token_hash=hash_token(secret))
                revoke_api_key(session=session, key_id=key.id)
            list(lines)  # returns: the stream ended (a test that hangs here has its answer)
        assert client.get(f"/v1/jobs/{job_id}").status_code == 401


def test_checkpoints_list_and_download_as_tar(client, settings, job_id) -> None:
    make_checkpoint(settings, job_id, 2)
    listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    assert [(c["step"], c["kind"], c["bytes"]) for c in listed["data"]] == [
        (2, "model", 1280 + 23)
    ]  # weights + config.json
    response = client.get(listed["data"][0]["download_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        names = sorted(archive.getnames())
        weights = archive.extractfile(f"{job_id}-step-2/model.safetensors").read()
    assert names == [f"{job_id}-step-2/config.json", f"{job_id}-step-2/model.safetensors"]  # no trainer_state
    assert weights == bytes(range(256)) * 5


def test_download_of_a_missing_checkpoint_is_404(client, settings, job_id) -> None:
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/9/download")
    assert response.status_code == 404 and response.json()["error"]["code"] == "checkpoint_not_found"
    shutil.rmtree(settings.artifact_dir / make_checkpoint(settings, job_id, 4))
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/4/download")
    assert response.status_code == 404 and "no longer has the files" in response.json()["error"]["message"]
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/x/download").status_code == 422


def _tar_names(response) -> list[str]:
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        return sorted(archive.getnames())


def test_a_lora_checkpoint_downloads_as_adapter_or_merged(client, settings, job_id) -> None:
    make_checkpoint(settings, job_id, 3, kind="adapter")
    url = f"/v1/jobs/{job_id}/checkpoints/3/download"
    [listed] = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert (listed["kind"], listed["merged_download_url"]) == ("adapter", None)
    adapter = [
        f"{job_id}-step-3/{name}"
        for name in ("adapter_config.json", "adapter_model.safetensors", "config.json")
    ]
    assert _tar_names(client.get(url)) == _tar_names(client.get(url, params={"format": "adapter"})) == adapter

    response = client.get(url, params={"format": "merged"})  # not merged (yet): says how to get one
    error = response.json()["error"]
    assert response.status_code == 404 and "export-merged" in error["message"]

    merged = merged_dir(settings.job_dir(job_id), 3)  # as the worker leaves it when the job succeeds
    merged.mkdir(parents=True)
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "model.safetensors").write_bytes(b"w" * 64)
    [listed] = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert listed["merged_download_url"] == f"http://testserver{url}?format=merged"
    assert _tar_names(client.get(listed["merged_download_url"])) == [
        f"{job_id}-step-3-merged/config.json",
        f"{job_id}-step-3-merged/model.safetensors",
    ]


def test_a_full_model_checkpoint_has_no_adapter(client, settings, job_id) -> None:
    make_checkpoint(settings, job_id, 2)
    url = f"/v1/jobs/{job_id}/checkpoints/2/download"
    assert client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"][0]["merged_download_url"] is None
    assert _tar_names(client.get(url, params={"format": "merged"})) == _tar_names(client.get(url))
    response = client.get(url, params={"format": "adapter"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "format"
    assert "full model" in response.json()["error"]["message"]
    response = client.get(url, params={"format": "gguf"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "format"


def _open_fds_under(directory) -> list[str]:
    """What this process holds open under ``directory`` (deleted files included), from /proc."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith(str(directory)):
            held.append(target)
    return held


def test_a_checkpoint_pruned_while_it_downloads_still_comes_whole(client, settings, job_id) -> None:
    stored = make_checkpoint(settings, job_id, 2)
    directory = settings.artifact_dir / stored
    (directory / "model.safetensors").write_bytes(os.urandom(3 * CHUNK + 5))  # several pieces
    sizes = {"config.json": 23, "model.safetensors": 3 * CHUNK + 5}
    weights = (directory / "model.safetensors").read_bytes()

    # What the route streams: every file opened before the response starts.
    handles = ExitStack()
    files = download_files(settings, stored, handles)
    assert files is not None
    stream = closing(tar_stream(files, "ckpt"), handles)
    body = [next(stream)]  # the response has started ...
    shutil.rmtree(directory)  # ... when the trainer prunes the checkpoint (keep_last_checkpoints)
    assert not directory.exists() and len(_open_fds_under(directory)) == 2
    body += list(stream)

    with tarfile.open(fileobj=io.BytesIO(b"".join(body))) as archive:
        assert {m.name.removeprefix("ckpt/"): m.size for m in archive.getmembers()} == sizes
        assert archive.extractfile("ckpt/model.safetensors").read() == weights
    assert _open_fds_under(directory) == []  # closed once the stream ended

    # A client that goes away after the first piece: its handles close with the stream.
    make_checkpoint(settings, job_id, 4)
    handles = ExitStack()
    files = download_files(settings, f"{stored[: -len('2')]}4", handles)
    assert files is not None
    stream = closing(tar_stream(files, "ckpt"), handles)
    next(stream)
    assert len(_open_fds_under(settings.job_dir(job_id))) == 2
    stream.close()
    assert _open_fds_under(settings.job_dir(job_id)) == []


def test_a_checkpoint_pruned_before_its_download_is_404_saying_so(client, settings, job_id) -> None:
    shutil.rmtree(settings.artifact_dir / make_checkpoint(settings, job_id, 2))  # its row is still there
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/2/download")
    error = response.json()["error"]
    assert response.status_code == 404 and error["code"] == "checkpoint_not_found"
    assert "pruned" in error["message"] and "keep_last_checkpoints" in error["message"]
    assert job_id in error["message"] and "(step 2)" in error["message"]

    # Caught halfway through its deletion (the directory is still there, a file is gone).
    directory = settings.artifact_dir / make_checkpoint(settings, job_id, 4)
    (directory / "model.safetensors").unlink()
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/4/download")
    assert response.status_code == 404 and "pruned" in response.json()["error"]["message"]
    assert "(step 4)" in response.json()["error"]["message"]
    assert _open_fds_under(directory) == []
