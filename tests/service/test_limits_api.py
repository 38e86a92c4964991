"""Limits and hostile input on PostgreSQL: each limit is a setting, each refusal a 4xx naming it
and the value; oversize, malformed and mistyped bodies; path traversal never reads a file
outside the artifact directory."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from sqlalchemy import func, select

from jobs.db import transaction
from jobs.models import Dataset, Job
from tests.service.factories import api_key, arithmetic_rows, bearer, job_spec, jsonl, make_checkpoint, upload

SECRET = "s3cr3t-outside-the-artifacts"


def count(settings, model) -> int:
    with transaction(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(model))


def stored_files(settings) -> list[str]:
    return sorted(p.name for p in settings.datasets_dir.iterdir()) if settings.datasets_dir.exists() else []


@pytest.fixture
def dataset_id(client) -> str:
    return upload(client).json()["id"]


@pytest.fixture
def outside(settings):
    """A file and a Hugging Face-looking directory next to (not in) the artifact directory."""
    root = settings.data_dir / "outside"
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text(SECRET)
    (root / "passwd").write_text(SECRET)
    return root


# -- the job spec's caps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "setting", "param"),
    [
        ("group_size", "max_group_size", "group_size"),
        ("prompts_per_step", "max_prompts_per_step", "hyperparameters.prompts_per_step"),
        ("max_steps", "max_steps", "hyperparameters.max_steps"),
        ("max_prompt_length", "max_prompt_length", "hyperparameters.max_prompt_length"),
        ("max_completion_length", "max_completion_length", "hyperparameters.max_completion_length"),
    ],
)
def test_each_hyperparameter_cap_is_a_422_naming_the_setting(
    client, settings, sent, dataset_id, field, setting, param
) -> None:
    setattr(settings, setting, 16)

    def spec(value: int) -> dict:
        return job_spec(
            dataset_id, **({field: value} if field == "group_size" else {"hyperparameters": {field: value}})
        )

    response = client.post("/v1/jobs", json=spec(17))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("limit_exceeded", param)
    assert error["message"] == f"{field} is 17, above this server's limit of 16 (GRPO_{setting.upper()})"
    assert count(settings, Job) == 0 and sent == []
    assert client.post("/v1/jobs", json=spec(16)).status_code == 201  # the limit itself is allowed


def test_group_size_in_the_hyperparameters_is_capped_too(client, settings, dataset_id) -> None:
    settings.max_group_size = 4
    spec = job_spec(dataset_id, hyperparameters={"group_size": 5})
    del spec["group_size"]
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422 and response.json()["error"]["param"] == "hyperparameters.group_size"


def test_active_jobs_per_owner(client, settings, sent, dataset_id) -> None:
    settings.max_active_jobs_per_owner = 2
    first, second = (client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"] for _ in range(2))
    refused = client.post("/v1/jobs", json=job_spec(dataset_id))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "too_many_active_jobs"
    assert (
        "2 queued or running" in error["message"]
        and "(GRPO_MAX_ACTIVE_JOBS_PER_OWNER) is 2" in error["message"]
    )
    assert sent == [first, second]

    bob = bearer(api_key(settings, owner="bob"))  # another owner has room of their own
    bobs_dataset = upload(client, headers=bob).json()["id"]
    assert client.post("/v1/jobs", json=job_spec(bobs_dataset), headers=bob).status_code == 201

    client.post(f"/v1/jobs/{first}/cancel")  # an ended job frees its place
    assert client.post("/v1/jobs", json=job_spec(dataset_id)).status_code == 201


# -- dataset uploads ------------------------------------------------------------------------------


def test_rows_over_the_limit_are_413_and_nothing_is_stored(client, settings) -> None:
    settings.max_dataset_rows = 3
    assert upload(client, rows=arithmetic_rows(3)).status_code == 201
    response = upload(client, rows=arithmetic_rows(4))
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("payload_too_large", "file")
    assert "more than 3 rows" in error["message"] and "GRPO_MAX_DATASET_ROWS" in error["message"]
    assert count(settings, Dataset) == 1 and len(stored_files(settings)) == 1


def test_an_upload_declared_over_the_limit_is_refused_before_it_is_read(client, settings) -> None:
    settings.max_dataset_bytes = 1000
    body = jsonl(arithmetic_rows(5000))  # far past the limit and its allowance for the form around it
    response = upload(client, content=body)
    assert response.status_code == 413
    assert "GRPO_MAX_DATASET_BYTES" in response.json()["error"]["message"]
    assert count(settings, Dataset) == 0 and stored_files(settings) == []


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"prompt": "p"}\n', "multipart/form-data", 400),  # no boundary
        (
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n{"prompt"',
            "multipart/form-data; boundary=xyz",
            422,
        ),  # cut off mid-part: no complete file
        (b'prompt,answer\n"1+1",2\n', None, 422),  # CSV, not JSONL
        (b'{"prompt": "p"}\n' * 3 + b"\x00\x01\x02", None, 422),  # binary tail
    ],
)
def test_malformed_uploads_are_4xx_and_store_nothing(client, settings, content, content_type, status) -> None:
    if content_type is None:
        response = upload(client, content=content)
    else:
        response = client.post("/v1/datasets", content=content, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    assert count(settings, Dataset) == 0 and stored_files(settings) == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded", None]
)
def test_an_upload_that_is_not_multipart_is_415(client, content_type) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/datasets", content=b'{"prompt": "p"}', headers=headers)
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type" and "takes multipart/form-data" in error["message"]


# -- JSON bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None]
)
def test_a_job_that_is_not_json_is_415(client, settings, dataset_id, content_type) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/jobs", content=json.dumps(job_spec(dataset_id)).encode(), headers=headers)
    assert response.status_code == 415, response.text
    assert "POST /v1/jobs takes application/json" in response.json()["error"]["message"]
    assert count(settings, Job) == 0


def test_json_with_a_charset_is_json(client, dataset_id) -> None:
    response = client.post(
        "/v1/jobs",
        content=json.dumps(job_spec(dataset_id)).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 201


def test_huge_json_is_413_before_it_is_parsed(client, settings, dataset_id) -> None:
    spec = job_spec(dataset_id, name="x" * 200, hyperparameters={"padding": "y" * (2 << 20)})
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert (
        error["message"]
        == f"the request body is larger than this server's limit of {settings.max_request_bytes} "
        f"bytes (GRPO_MAX_REQUEST_BYTES)"
    )
    assert count(settings, Job) == 0


def test_huge_json_without_a_content_length_is_413_too(client, settings, dataset_id) -> None:
    def chunks():  # sent chunked: the size is only known as it arrives
        yield b'{"padding": "'
        for _ in range(40):
            yield b"z" * 65536
        yield b'"}'

    response = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "GRPO_MAX_REQUEST_BYTES" in response.json()["error"]["message"]


def test_deeply_nested_json_is_a_4xx(client, settings, dataset_id) -> None:
    body = b"[" * 100_000 + b"]" * 100_000  # within the size limit, past any parser's recursion
    response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500 and response.json()["error"]["message"]
    assert count(settings, Job) == 0


@pytest.mark.parametrize(
    "query",
    [
        "metrics?after_step=2147483648",
        "events?after=9223372036854775808",
        "samples?step=2147483648",
        "samples?after=9223372036854775808",
        "checkpoints/2147483648/download",
    ],
)
def test_numbers_past_the_database_s_integers_are_422_not_500(client, dataset_id, query) -> None:
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/{query}")
    assert response.status_code == 422, response.text


# -- path traversal -------------------------------------------------------------------------------

TRAVERSALS = [
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2foutside%2fpasswd",
    "%2Fetc%2Fpasswd",
    "..%252F..%252Fetc%252Fpasswd",
    "....//....//etc/passwd",
    "%2e%2e",
    "ds_..%5c..%5cwindows",
]


@pytest.mark.parametrize("evil", TRAVERSALS)
def test_traversal_in_ids_is_4xx_and_reads_nothing(client, settings, outside, evil) -> None:
    job_id = client.post("/v1/jobs", json=job_spec(upload(client).json()["id"])).json()["id"]
    make_checkpoint(settings, job_id, 2)
    for path in (
        f"/v1/datasets/{evil}",
        f"/v1/jobs/{evil}",
        f"/v1/jobs/{evil}/metrics",
        f"/v1/jobs/{evil}/events",
        f"/v1/jobs/{evil}/checkpoints",
        f"/v1/jobs/{evil}/checkpoints/2/download",
        f"/v1/jobs/{job_id}/checkpoints/{evil}/download",
    ):
        response = client.get(path)
        assert 400 <= response.status_code < 500, (path, response.status_code)
        assert SECRET not in response.text and "root:" not in response.text
    response = client.post("/v1/jobs", json=job_spec("../../outside/passwd"))
    assert response.status_code == 404 and SECRET not in response.text


@pytest.mark.parametrize(
    "stored", ["../outside/model", "../../outside/model", "OUTSIDE", "jobs/../../outside/model"]
)
def test_a_checkpoint_stored_outside_the_artifacts_is_never_downloaded(
    client, settings, outside, stored
) -> None:
    """The stored path comes from the worker; the API still will not follow it out of the artifacts."""
    stored = str(outside / "model") if stored == "OUTSIDE" else stored
    job_id = client.post("/v1/jobs", json=job_spec(upload(client).json()["id"])).json()["id"]
    make_checkpoint(settings, job_id, 2, path=stored)
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/2/download")
    assert response.status_code == 404 and SECRET not in response.text


def test_links_inside_a_checkpoint_are_left_out_of_the_download(client, settings, outside) -> None:
    job_id = client.post("/v1/jobs", json=job_spec(upload(client).json()["id"])).json()["id"]
    directory = settings.artifact_dir / make_checkpoint(settings, job_id, 2)
    os.symlink(outside / "passwd", directory / "tokenizer.json")
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/2/download")
    assert response.status_code == 200 and SECRET.encode() not in response.content
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        assert sorted(n.rsplit("/", 1)[-1] for n in archive.getnames()) == [
            "config.json",
            "model.safetensors",
        ]


def test_an_upload_s_file_name_is_only_a_label(client, settings) -> None:
    response = upload(client, name="../../outside/evil.jsonl")
    assert response.status_code == 201 and response.json()["name"] == "../../outside/evil.jsonl"
    assert stored_files(settings) == [f"{response.json()['id']}.jsonl"]
    assert not any("evil" in path.name for path in settings.data_dir.rglob("*"))
