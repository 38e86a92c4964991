"""The OpenAI-compatible routes on PostgreSQL, over HTTP (the broker is a list): how files and
fine-tuning requests become datasets and GRPO jobs, the objects they answer with, and the 400s
that name the OpenAI param at fault. ``test_openai_sdk.py`` drives the same routes with the
official SDK and a real worker."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import openai
import pytest
from sqlalchemy import update

from jobs.db import transaction
from jobs.models import Job, utcnow
from jobs.queries import add_event, append_metrics, claim_job
from tests.service.factories import api_key, bearer, jsonl, make_checkpoint
from trainer.config import GRPOConfig

RFT_ROWS = [
    {
        "messages": [
            {"role": "developer", "content": "Answer with a number."},
            {"role": "user", "content": [{"type": "text", "text": f"What is {i} + 1?"}]},
        ],
        "reference_answer": str(i + 1),
        "difficulty": i % 3,
    }
    for i in range(10)
]


def upload_file(client, rows=None, *, content: bytes | None = None, purpose: str = "fine-tune"):
    body = content if content is not None else jsonl(rows if rows is not None else RFT_ROWS)
    return client.post(
        "/v1/files", files={"file": ("train.jsonl", body, "application/jsonl")}, data={"purpose": purpose}
    )


def string_check(**overrides) -> dict:
    return {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference_answer}}",
        "operation": "eq",
        **overrides,
    }


def rft_job(
    file_id: str, grader: dict | None = None, hyperparameters: dict | None = None, **overrides
) -> dict:
    return {
        "model": "org/model",
        "training_file": file_id,
        "method": {
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader or string_check(),
                "hyperparameters": hyperparameters if hyperparameters is not None else {"group_size": 2},
            },
        },
        **overrides,
    }


@pytest.fixture
def file_id(client) -> str:
    return upload_file(client).json()["id"]


def refused(response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


# --- files -------------------------------------------------------------------------------------


def test_an_rft_file_becomes_a_dataset_whose_messages_are_the_prompt(client) -> None:
    response = upload_file(client)
    assert response.status_code == 200, response.text
    file = response.json()
    assert {k: file[k] for k in ("object", "filename", "purpose", "status", "rows")} == {
        "object": "file",
        "filename": "train.jsonl",
        "purpose": "fine-tune",
        "status": "processed",
        "rows": 10,
    }
    assert file["fields"] == ["difficulty", "messages", "prompt", "reference_answer"]
    assert isinstance(file["created_at"], int) and file["bytes"] > 0
    assert client.get(f"/v1/datasets/{file['id']}").json()["rows"] == 10  # the same thing, natively

    first = json.loads(client.get(f"/v1/files/{file['id']}/content").text.splitlines()[0])
    assert first["prompt"] == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 0 + 1?"},
    ]
    assert first["messages"] == RFT_ROWS[0]["messages"] and first["reference_answer"] == "1"


def test_bad_lines_are_reported_as_a_dataset_upload_reports_them(client) -> None:
    content = (
        jsonl(RFT_ROWS[:2])
        + b'{"messages": "hi"}\nnot json\n'
        + jsonl([{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}])
    )
    message = refused(upload_file(client, content=content), "file")
    assert (
        message.startswith("file: 3 bad line(s) — line 3: missing 'prompt'")
        and "line 4: not valid JSON" in message
    )
    assert "each line's messages" in message
    assert [d["line"] for d in upload_file(client, content=content).json()["error"]["details"]] == [3, 4, 5]


def test_only_the_fine_tune_purpose_is_served(client) -> None:
    assert "purpose 'assistants' is not served here" in refused(
        upload_file(client, purpose="assistants"), "purpose"
    )


def test_files_are_listed_retrieved_and_deleted_when_no_job_uses_them(client, file_id) -> None:
    other = upload_file(client).json()["id"]
    page = client.get("/v1/files", params={"limit": 1}).json()
    assert (page["object"], [f["id"] for f in page["data"]], page["has_more"]) == ("list", [other], True)
    assert [f["id"] for f in client.get("/v1/files", params={"after": other}).json()["data"]] == [file_id]
    assert client.get("/v1/files", params={"purpose": "batch"}).json()["data"] == []
    assert client.get(f"/v1/files/{file_id}").json()["id"] == file_id

    job_id = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id)).json()["id"]
    in_use = client.delete(f"/v1/files/{file_id}")
    assert in_use.status_code == 409 and job_id in in_use.json()["error"]["message"]
    assert in_use.headers["x-should-retry"] == "false"
    assert client.delete(f"/v1/files/{other}").json() == {"id": other, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{other}").status_code == 404
    assert client.get(f"/v1/files/{other}/content").status_code == 404


# --- creating jobs -----------------------------------------------------------------------------


def test_a_string_check_job_is_a_grpo_job_with_a_string_check_reward(client, sent, file_id) -> None:
    body = rft_job(
        file_id,
        hyperparameters={
            "n_epochs": 3,
            "batch_size": 4,
            "learning_rate_multiplier": 2.0,
            "group_size": 2,
            "max_completion_length": 16,
        },
        seed=7,
        suffix="arith",
        metadata={"team": "math"},
    )
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert sent == [job["id"]]
    assert {
        k: job[k]
        for k in (
            "object",
            "status",
            "model",
            "training_file",
            "validation_file",
            "seed",
            "suffix",
            "metadata",
            "organization_id",
            "fine_tuned_model",
            "error",
        )
    } == {
        "object": "fine_tuning.job",
        "status": "queued",
        "model": "org/model",
        "training_file": file_id,
        "validation_file": None,
        "seed": 7,
        "suffix": "arith",
        "metadata": {"team": "math"},
        "organization_id": "alice",
        "fine_tuned_model": None,
        "error": None,
    }
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2.0}
    assert job["method"]["reinforcement"]["grader"] == string_check()
    assert job["reward"] == [  # as the job runs it: the weight filled
        {
            "type": "string_check",
            "weight": 1.0,
            "name": "exact",
            "input": "{{sample.output_text}}",
            "reference": "{{item.reference_answer}}",
            "operation": "eq",
        }
    ]
    assert job["max_steps"] == 8  # ceil(3 epochs * 10 rows / 4 per step)

    native = client.get(f"/v1/jobs/{job['id']}").json()  # the same job, natively
    translated = {
        "group_size": 2,
        "max_completion_length": 16,
        "prompts_per_step": 4,
        "max_steps": 8,
        "learning_rate": 2e-6,
        "seed": 7,
    }
    # every hyperparameter the job runs with: the translated ones, and the defaults of the rest
    assert native["hyperparameters"] == {**GRPOConfig().to_dict(), **translated}
    assert (native["name"], native["group_size"]) == ("arith", 2)


def test_a_multi_grader_becomes_weighted_rewards(client, file_id) -> None:
    grader = {
        "type": "multi",
        "name": "mix",
        "calculate_output": "(3 * exact + fuzzy) / 4 - 0.5 * long",
        "graders": {
            "exact": string_check(name="e"),
            "fuzzy": {
                "type": "text_similarity",
                "name": "f",
                "input": "{{sample.output_text}}",
                "reference": "{{item.reference_answer}}",
                "evaluation_metric": "fuzzy_match",
            },
            "long": {
                "type": "python",
                "name": "p",
                "source": "def grade(sample, item):\n    return len(sample['output_text']) / 100\n",
            },
            "unused": string_check(operation="ne"),
        },
    }
    job = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id, grader)).json()
    assert [(r["name"], r["type"], r["weight"]) for r in job["reward"]] == [
        ("exact", "string_check", 0.75),
        ("fuzzy", "text_similarity", 0.25),
        ("long", "python_grader", -0.5),
        ("unused", "string_check", 0.0),
    ]


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        (
            {"method": {"type": "supervised", "supervised": {}}},
            "method.type",
            "'supervised' fine-tuning is not supported",
        ),
        ({"method": {"type": "dpo"}}, "method.type", "reinforcement fine-tuning (GRPO) only"),
        ({"method": None}, "method", "this server runs reinforcement fine-tuning"),
        (
            {"grader": {"type": "score_model", "name": "s", "model": "gpt-4o", "input": []}},
            "method.reinforcement.grader.type",
            "reward_model",
        ),
        ({"grader": {"type": "label_model", "name": "l"}}, "method.reinforcement.grader.type", "http"),
        (
            {
                "grader": {
                    "type": "text_similarity",
                    "name": "t",
                    "input": "{{sample.output_text}}",
                    "reference": "x",
                    "evaluation_metric": "bleu",
                }
            },
            "method.reinforcement.grader.evaluation_metric",
            "'bleu' is not supported",
        ),
        (
            {"grader": string_check(operation="glob")},
            "method.reinforcement.grader.operation",
            "unknown value 'glob'",
        ),
        (
            {"grader": string_check(reference="{{item.answer}}")},
            "method.reinforcement.grader",
            "field(s) 'answer', which dataset",
        ),
        (
            {"grader": {"type": "python", "name": "p", "source": "def grade(s, i) return 1"}},
            "method.reinforcement.grader.source",
            "is not valid Python",
        ),
        (
            {"grader": {"type": "python", "name": "p", "source": "grade = max", "image_tag": "2025-05-08"}},
            "method.reinforcement.grader.image_tag",
            "standard library only",
        ),
        (
            {
                "grader": {
                    "type": "multi",
                    "name": "m",
                    "calculate_output": "max(a, b)",
                    "graders": {"a": string_check(), "b": string_check()},
                }
            },
            "method.reinforcement.grader.calculate_output",
            "only a weighted sum",
        ),
        (
            {
                "grader": {
                    "type": "multi",
                    "name": "m",
                    "calculate_output": "a * b",
                    "graders": {"a": string_check(), "b": string_check()},
                }
            },
            "method.reinforcement.grader.calculate_output",
            "no functions, constants or products",
        ),
        (
            {
                "grader": {
                    "type": "multi",
                    "name": "m",
                    "calculate_output": "a + 1",
                    "graders": {"a": string_check(), "b": string_check()},
                }
            },
            "method.reinforcement.grader.calculate_output",
            "only a weighted sum",
        ),
        (
            {
                "grader": {
                    "type": "multi",
                    "name": "m",
                    "calculate_output": "a + c",
                    "graders": {"a": string_check(), "b": string_check()},
                }
            },
            "method.reinforcement.grader.calculate_output",
            "names no grader 'c'",
        ),
        (
            {
                "grader": {
                    "type": "multi",
                    "name": "m",
                    "calculate_output": "a + b",
                    "graders": {"a": string_check(), "b": string_check(operation="is")},
                }
            },
            "method.reinforcement.grader.graders.b.operation",
            "unknown value 'is'",
        ),
        (
            {"hyperparameters": {"n_epochs": 0}},
            "method.reinforcement.hyperparameters.n_epochs",
            "'auto' or an integer",
        ),
        (
            {"hyperparameters": {"n_epochs": 1, "max_steps": 5}},
            "method.reinforcement.hyperparameters.n_epochs",
            "give n_epochs or max_steps, not both",
        ),
        (
            {"hyperparameters": {"n_epochs": 10**6}},
            "method.reinforcement.hyperparameters.n_epochs",
            "above this server's limit",
        ),
        (
            {"hyperparameters": {"group_size": 1}},
            "method.reinforcement.hyperparameters.group_size",
            "must be >= 2",
        ),
        (
            {"hyperparameters": {"warp": 9}},
            "method.reinforcement.hyperparameters.warp",
            "unknown hyperparameter",
        ),
        (
            {"hyperparameters": {"compute_multiplier": 2.0}},
            "method.reinforcement.hyperparameters.compute_multiplier",
            "group_size",
        ),
        (
            {"hyperparameters": {"reasoning_effort": "high"}},
            "method.reinforcement.hyperparameters.reasoning_effort",
            "no equivalent",
        ),
        (
            {"top": {"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}},
            "integrations",
            "not supported",
        ),
        (
            {"top": {"hyperparameters": {"n_epochs": 2}}},
            "hyperparameters",
            "method.reinforcement.hyperparameters",
        ),
        ({"top": {"colour": "blue"}}, "colour", "Extra inputs are not permitted"),
        ({"top": {"model": "not a model!"}}, "model", "neither a Hugging Face hub id"),
    ],
)
def test_what_cannot_run_here_is_a_400_naming_the_openai_param(client, file_id, change, param, says) -> None:
    body = rft_job(file_id, change.get("grader"), change.get("hyperparameters", {"group_size": 2}))
    body.update(change.get("top", {}))
    if "method" in change:
        body["method"] = change["method"]
    assert says in refused(client.post("/v1/fine_tuning/jobs", json=body), param)


def test_files_that_are_not_yours_or_not_there_are_404s(client, settings, file_id) -> None:
    theirs = upload_file(client, RFT_ROWS).json()["id"]
    with_bob = {"headers": bearer(api_key(settings, owner="bob"))}
    assert client.get(f"/v1/files/{theirs}", **with_bob).status_code == 404
    response = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id), **with_bob)
    assert (response.status_code, response.json()["error"]["param"]) == (404, "training_file")
    response = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id, validation_file="ds_nope"))
    assert (response.status_code, response.json()["error"]["param"]) == (404, "validation_file")


# --- following jobs ----------------------------------------------------------------------------


def test_jobs_list_newest_first_by_cursor_and_by_metadata(client, settings, file_id) -> None:
    ids = [
        client.post("/v1/fine_tuning/jobs", json=rft_job(file_id, metadata={"n": str(i)})).json()["id"]
        for i in range(3)
    ]
    first = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert (first["object"], [j["id"] for j in first["data"]], first["has_more"]) == (
        "list",
        ids[:0:-1],
        True,
    )
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
    assert ([j["id"] for j in rest["data"]], rest["has_more"]) == ([ids[0]], False)
    assert [
        j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"metadata[n]": "1"}).json()["data"]
    ] == [ids[1]]
    assert client.get("/v1/fine_tuning/jobs", params={"metadata[n]": "9"}).json()["data"] == []
    assert (
        client.get("/v1/fine_tuning/jobs", headers=bearer(api_key(settings, owner="bob"))).json()["data"]
        == []
    )
    response = client.get(f"/v1/fine_tuning/jobs/{ids[0]}", headers=bearer(api_key(settings, owner="bob")))
    assert (response.status_code, response.json()["error"]["code"]) == (404, "job_not_found")


def test_pause_resume_and_cancel(client, sent, file_id) -> None:
    job_id = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id)).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    assert sent == [job_id, job_id]
    conflict = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert conflict.status_code == 409 and conflict.headers["x-should-retry"] == "false"
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and isinstance(cancelled["finished_at"], int)


def test_events_come_newest_first_as_openai_lists_them(client, settings, file_id) -> None:
    job_id = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id)).json()["id"]
    with transaction(settings.database_url) as session:
        add_event(session=session, job_id=job_id, kind="log", level="warning", message="reward errors")
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    assert [(e["message"], e["level"]) for e in events["data"]] == [
        ("cancelled before it started", "info"),
        ("reward errors", "warn"),
        ("queued", "info"),
    ]
    assert all(e["object"] == "fine_tuning.job.event" and e["type"] == "message" for e in events["data"])
    older = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": events["data"][0]["id"], "limit": 1}
    )
    assert [e["message"] for e in older.json()["data"]] == ["reward errors"] and older.json()["has_more"]
    refused(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": "ftevent-x"}), "after")


def test_a_succeeded_jobs_checkpoints_carry_their_steps_metrics(client, settings, file_id) -> None:
    job_id = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id, suffix="s1")).json()["id"]
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="w")
        for step in (1, 2, 3):
            append_metrics(
                session=session, job_id=job_id, step=step, metrics={"loss": step / 10, "reward": step}
            )
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="succeeded", step=3, finished_at=utcnow(), started_at=utcnow() - timedelta(seconds=9)
            )
        )
    for step in (2, 3):
        make_checkpoint(settings, job_id, step)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["fine_tuned_model"] == f"ft:model:alice:s1:{job_id}:ckpt-step-3"

    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    assert [(c["step_number"], c["metrics"]) for c in page["data"]] == [
        (3, {"step": 3.0, "train_loss": 0.3, "loss": 0.3, "reward": 3.0}),
        (2, {"step": 2.0, "train_loss": 0.2, "loss": 0.2, "reward": 2.0}),
    ]
    newest = page["data"][0]
    assert newest["fine_tuned_model_checkpoint"] == job["fine_tuned_model"]
    assert newest["object"] == "fine_tuning.job.checkpoint" and newest["fine_tuning_job_id"] == job_id
    assert client.get(newest["download_url"]).status_code == 200
    after = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"after": newest["id"]}).json()
    assert [c["step_number"] for c in after["data"]] == [2]


def test_a_download_url_works_with_the_openai_sdks_base_url(client, settings, file_id) -> None:
    """The SDK joins a relative path to its base_url, ``http://host/v1``: a host-relative
    ``/v1/jobs/...`` became ``/v1/v1/jobs/...``. The URL is absolute, the same natively."""
    job_id = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id)).json()["id"]
    make_checkpoint(settings, job_id, 2)
    sdk = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=client.headers["Authorization"].split()[1],
        http_client=client,
        max_retries=0,
    )
    [checkpoint] = sdk.fine_tuning.jobs.checkpoints.list(job_id).data
    url = checkpoint.model_extra["download_url"]
    assert url == f"http://testserver/v1/jobs/{job_id}/checkpoints/2/download"
    assert (
        client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"][0]["download_url"] == url
    )  # one builder
    response = sdk.get(url, cast_to=httpx.Response)
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    assert str(response.url) == url
