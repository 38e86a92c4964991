"""Text PostgreSQL cannot store (NUL, lone surrogates) and numbers a run cannot use (NaN,
±Infinity, integers past 32 bits), sent to the real API on PostgreSQL: each a 4xx naming the
field, never a 500. Text the service writes itself (samples, events, failure reasons: a model's
or a grader's output) is stored with such characters replaced."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.exc import DataError

from api.main import create_app
from jobs.db import transaction
from jobs.models import Dataset, Job, JobStatus
from jobs.queries import add_event, add_samples, claim_job, finish_job, list_events, list_samples
from jobs.text import REPLACEMENT
from tests.service.e2e import wait_until_ended
from tests.service.factories import api_key, bearer, job_spec, jsonl, upload
from tests.trainer.factories import NUMERIC_HYPERPARAMETERS
from worker.runner import internal_failure_reason

NUL, SURROGATE = "\x00", "\ud800"


@pytest.fixture
def dataset_id(client) -> str:
    return upload(client).json()["id"]


def post_raw(client: TestClient, path: str, body: Any) -> Any:
    """POST ``body`` as JSON text the way a client that writes NaN, Infinity and ``\\ud800``
    escapes sends it (Python's json does; httpx's own encoder refuses to)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def refused(response: Any, status: int, param: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def job_count(settings) -> int:
    with transaction(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(Job))


# --- text a user sends ---------------------------------------------------------------------------


def set_at(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    target = body
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return body


JOB_STRINGS = [  # where in a job spec, the value put there (with {bad} for the character), the param named
    (("name",), "job{bad}", "name"),
    (("base_model",), "org/model{bad}", "base_model"),
    (("dataset_id",), "ds_{bad}", "dataset_id"),
    (("eval_dataset_id",), "ds_{bad}", "eval_dataset_id"),
    (("reward", 1, "pattern"), "[0-9]{bad}", "reward[1].pattern"),
    (("reward", 0, "extract"), "last{bad}", "reward[0].extract"),
    (("reward", 0, "name"), "exact{bad}", "reward[0].name"),
    (
        ("hyperparameters", "lora"),
        {"target_modules": ["q_proj", "v{bad}"]},
        "hyperparameters.lora.target_modules[1]",
    ),
    (("hyperparameters", "loss_type"), "dapo{bad}", "hyperparameters.loss_type"),
]


def filled(value: Any, bad: str) -> Any:
    return json.loads(json.dumps(value).replace("{bad}", json.dumps(bad)[1:-1]))


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(("path", "value", "param"), JOB_STRINGS, ids=[p for _, _, p in JOB_STRINGS])
def test_unstorable_text_in_a_job_spec_is_a_422_naming_the_field(
    client, settings, sent, dataset_id, bad, path, value, param
) -> None:
    body = set_at(job_spec(dataset_id), path, filled(value, bad))
    message = refused(post_raw(client, "/v1/jobs", body), 422, param)
    # (pydantic itself refuses a lone surrogate in a field with a length limit)
    assert "NUL" in message if bad == NUL else "surrogate" in message or "unicode" in message
    assert job_count(settings) == 0 and sent == []


def test_unstorable_keys_are_refused_at_the_object_that_holds_them(client, settings, dataset_id) -> None:
    spec = job_spec(dataset_id, hyperparameters={f"seed{NUL}": 1})
    assert "has a key that contains a NUL" in refused(
        post_raw(client, "/v1/jobs", spec), 422, "hyperparameters"
    )
    spec = job_spec(dataset_id, reward=[{"type": "exact_match", f"x{SURROGATE}": 1}])
    assert "surrogate" in refused(post_raw(client, "/v1/jobs", spec), 422, "reward[0]")
    # An unknown top-level field is named by its key, with the characters replaced: the answer is
    # still written (a lone surrogate there is one pydantic itself refuses, as the body's).
    response = post_raw(client, "/v1/jobs", {**job_spec(dataset_id), f"k{NUL}": 1})
    assert response.status_code == 422 and response.json()["error"]["param"] == f"k{REPLACEMENT}", (
        response.text
    )
    response = post_raw(client, "/v1/jobs", {**job_spec(dataset_id), f"k{SURROGATE}": 1})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", (
        response.text
    )
    assert job_count(settings) == 0


RFT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "reference_answer": str(i + 1)}
    for i in range(4)
]


def rft_job(file_id: str, **overrides: Any) -> dict[str, Any]:
    grader = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference_answer}}",
        "operation": "eq",
    }
    return {
        "model": "org/model",
        "training_file": file_id,
        "method": {
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": {"group_size": 2}},
        },
        **overrides,
    }


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": "org/model{bad}"}, "model"),
        ({"suffix": "arith{bad}"}, "suffix"),
        ({"name": "job{bad}"}, "name"),
        ({"training_file": "ds_{bad}"}, "training_file"),
        ({"metadata": {"team": "a{bad}"}}, "metadata.team"),
        ({"metadata": {"te{bad}am": "a"}}, "metadata"),
        (
            {
                "method": {
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": {
                            "type": "string_check",
                            "name": "exact",
                            "input": "{{sample.output_text}}",
                            "reference": "x{bad}",
                            "operation": "eq",
                        }
                    },
                }
            },
            "method.reinforcement.grader.reference",
        ),
    ],
)
def test_unstorable_text_in_an_openai_job_is_a_400_naming_the_param(
    client, settings, bad, change, param
) -> None:
    file_id = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", jsonl(RFT_ROWS), "application/jsonl")},
        data={"purpose": "fine-tune"},
    ).json()["id"]
    message = refused(
        post_raw(client, "/v1/fine_tuning/jobs", rft_job(file_id, **filled(change, bad))), 400, param
    )
    assert message.startswith(f"{param}: ")  # the SDK shows the message alone
    assert job_count(settings) == 0


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"reward": [{"type": "regex", "pattern": "a{bad}"}]}, "reward[0].pattern"),
        ({"samples": [{"completion": "5{bad}", "row": {"answer": "5"}}]}, "samples[0].completion"),
        (
            {"samples": [{"completion": "5", "prompt": "2+3{bad}", "row": {"answer": "5"}}]},
            "samples[0].prompt",
        ),
        (
            {
                "samples": [
                    {
                        "completion": "5",
                        "prompt": [{"role": "user", "content": "2+3{bad}"}],
                        "row": {"answer": "5"},
                    }
                ]
            },
            "samples[0].prompt[0].content",
        ),
        (
            {"samples": [{"completion": "5", "row": {"answer": ["5", "five{bad}"]}}]},
            "samples[0].row.answer[1]",
        ),
    ],
)
def test_unstorable_text_in_a_reward_run_is_a_422_naming_the_field(client, bad, change, param) -> None:
    body = {"reward": [{"type": "exact_match"}], "samples": [{"completion": "5", "row": {"answer": "5"}}]}
    refused(post_raw(client, "/v1/rewards/run", {**body, **filled(change, bad)}), 422, param)


def multipart(filename: str, content: bytes, **fields: str) -> dict[str, Any]:
    """A multipart/form-data request whose file name is sent as it is (httpx would escape a NUL)."""
    boundary = "grpo-test-boundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    body += (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def test_a_dataset_name_or_file_name_with_a_nul_is_refused_and_nothing_is_stored(client, settings) -> None:
    body = jsonl([{"prompt": "1 + 1?", "answer": "2"}])
    response = client.post(
        "/v1/datasets",
        files={"file": ("data.jsonl", body, "application/jsonl")},
        data={"name": f"arith{NUL}"},
    )
    assert "NUL" in refused(response, 422, "name")
    response = client.post("/v1/datasets", **multipart(f"da{NUL}ta.jsonl", body))
    assert "the file's name contains a NUL" in refused(response, 422, "file")
    response = client.post(
        "/v1/files", **multipart(f"tr{NUL}ain.jsonl", jsonl(RFT_ROWS), purpose="fine-tune")
    )
    refused(response, 400, "file")
    with transaction(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0
    assert (
        client.post(
            "/v1/datasets",
            files={"file": ("data.jsonl", body, "application/jsonl")},
            data={"name": "arith ✓ 𝛼"},
        ).json()["name"]
        == "arith ✓ 𝛼"
    )  # real non-ASCII is fine


# --- numbers -------------------------------------------------------------------------------------


FLOATS = [name for name, kind in NUMERIC_HYPERPARAMETERS if kind is float]  # generated from the config
INTEGERS = [name for name, kind in NUMERIC_HYPERPARAMETERS if kind is int]


def hyperparameter(name: str, value: Any) -> dict[str, Any]:
    if name.startswith("lora."):
        return {"lora": {name.removeprefix("lora."): value}}
    return {name: value}


def spec_with(dataset_id: str, name: str, value: Any) -> dict[str, Any]:
    spec = job_spec(dataset_id, hyperparameters=hyperparameter(name, value))
    del spec["group_size"]  # a top-level group_size would stand in for the one tried here
    return spec


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf")], ids=["NaN", "Infinity", "-Infinity"]
)
@pytest.mark.parametrize("name", FLOATS)
def test_a_non_finite_float_hyperparameter_is_a_422_naming_it(
    client, settings, sent, dataset_id, name, value
) -> None:
    response = post_raw(client, "/v1/jobs", spec_with(dataset_id, name, value))
    assert "finite" in refused(response, 422, f"hyperparameters.{name}")
    assert job_count(settings) == 0 and sent == []


@pytest.mark.parametrize("value", [2**70, -(2**70)], ids=["2**70", "-2**70"])
@pytest.mark.parametrize("name", INTEGERS)
def test_an_integer_hyperparameter_past_32_bits_is_a_422_naming_it(
    client, settings, dataset_id, name, value
) -> None:
    refused(post_raw(client, "/v1/jobs", spec_with(dataset_id, name, value)), 422, f"hyperparameters.{name}")
    assert job_count(settings) == 0


def test_seeds_are_what_the_seeding_calls_take(client, settings, dataset_id) -> None:
    message = refused(
        post_raw(client, "/v1/jobs", spec_with(dataset_id, "seed", 99999999999999999999)),
        422,
        "hyperparameters.seed",
    )
    assert "4294967295" in message
    assert post_raw(client, "/v1/jobs", spec_with(dataset_id, "seed", 2**32 - 1)).status_code == 201


def test_non_finite_and_huge_numbers_elsewhere_are_refused(client, settings, dataset_id) -> None:
    spec = job_spec(dataset_id)
    spec["group_size"] = 2**70
    refused(post_raw(client, "/v1/jobs", spec), 422, "group_size")
    spec = job_spec(dataset_id, reward=[{"type": "exact_match", "weight": float("nan")}])
    refused(post_raw(client, "/v1/jobs", spec), 422, "reward[0].weight")
    spec = job_spec(dataset_id, reward=[{"type": "exact_match", "weight": 1e300}])
    refused(post_raw(client, "/v1/jobs", spec), 422, "reward[0].weight")
    spec = job_spec(dataset_id, reward=[{"type": "math", "timeout_s": 2**70}])
    refused(post_raw(client, "/v1/jobs", spec), 422, "reward[0].timeout_s")
    body = {
        "reward": [{"type": "exact_match", "weight": float("inf")}],
        "samples": [{"completion": "5", "row": {"answer": "5"}}],
    }
    refused(post_raw(client, "/v1/rewards/run", body), 422, "reward[0].weight")
    assert job_count(settings) == 0


def test_a_nan_in_an_openai_job_is_a_400_naming_the_openai_param(client, settings) -> None:
    file_id = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", jsonl(RFT_ROWS), "application/jsonl")},
        data={"purpose": "fine-tune"},
    ).json()["id"]
    body = rft_job(file_id)
    body["method"]["reinforcement"]["hyperparameters"]["beta"] = float("nan")
    refused(post_raw(client, "/v1/fine_tuning/jobs", body), 400, "method.reinforcement.hyperparameters.beta")
    body["method"]["reinforcement"]["hyperparameters"] = {"n_epochs": 2**62}  # max_steps past 32 bits
    refused(
        post_raw(client, "/v1/fine_tuning/jobs", body), 400, "method.reinforcement.hyperparameters.n_epochs"
    )
    assert job_count(settings) == 0


# --- text the service writes itself --------------------------------------------------------------


def a_running_job(client, settings, dataset_id: str) -> str:
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    with transaction(settings.database_url) as session:
        assert claim_job(session=session, job_id=job_id, worker="w1") is not None
    return job_id


def test_a_models_and_a_graders_text_is_stored_with_the_unstorable_characters_replaced(
    client, settings, dataset_id
) -> None:
    job_id = a_running_job(client, settings, dataset_id)
    grader_error = f"exact: ValueError: bad byte {NUL} in the answer {SURROGATE}"
    with transaction(settings.database_url) as session:
        add_samples(
            session=session,
            job_id=job_id,
            step=1,
            samples=[
                {
                    "prompt": f"What is 1 + 1?{NUL}",
                    "completion": f"2{NUL}{SURROGATE}",
                    "reward": 1.0,
                    "rewards": {"exact": 1.0},
                    "errors": [grader_error],
                },
                {"prompt": "naïve ✓", "completion": "𝛼 \U0001f600 tab\there", "reward": float("nan")},
            ],
        )
        add_event(
            session=session,
            job_id=job_id,
            kind="log",
            level="warning",
            message=f"step 1: {grader_error}",
            data={"errors": [grader_error], f"key{NUL}": 1},
        )
    with transaction(settings.database_url) as session:
        assert finish_job(
            session=session,
            job_id=job_id,
            worker="w1",
            status=JobStatus.failed,
            reason=f"reward 'exact' failed on every completion: {grader_error}",
        )

    with transaction(settings.database_url) as session:
        (sample, plain), _ = list_samples(session=session, job_id=job_id)
        assert sample.data["completion"] == f"2{REPLACEMENT}{REPLACEMENT}"
        assert sample.data["prompt"] == f"What is 1 + 1?{REPLACEMENT}"
        assert plain.data == {"prompt": "naïve ✓", "completion": "𝛼 \U0001f600 tab\there", "reward": None}
        events, _ = list_events(session=session, job_id=job_id)
    shown = f"exact: ValueError: bad byte {REPLACEMENT} in the answer {REPLACEMENT}"
    warning = next(event for event in events if event.kind == "log")
    assert warning.message == f"step 1: {shown}" and warning.data == {
        "errors": [shown],
        f"key{REPLACEMENT}": 1,
    }
    # and the API shows them
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["failure_reason"].endswith(shown)
    assert (
        client.get(f"/v1/jobs/{job_id}/samples").json()["data"][0]["completion"]
        == f"2{REPLACEMENT}{REPLACEMENT}"
    )


def test_an_unexpected_worker_error_is_reported_without_its_sql(settings) -> None:
    with pytest.raises(DataError) as caught, transaction(settings.database_url) as session:
        session.execute(text("SELECT CAST(:value AS text)"), {"value": f"a{NUL}b"})
    assert "SELECT" in str(caught.value)  # what main showed the user
    reason = internal_failure_reason("job_123", caught.value)
    assert "DataError" in reason and "job_123" in reason and "worker log" in reason
    assert "SELECT" not in reason and "CAST" not in reason and "\n" not in reason


# --- end to end: a grader whose errors carry a NUL ------------------------------------------------

NUL_GRADER = "def grade(sample, item):\n    raise ValueError('bad\\x00byte')\n"


@pytest.fixture(scope="module")
def worker_client(redis_worker_settings, redis_worker) -> Iterator[TestClient]:
    settings = redis_worker_settings
    with TestClient(create_app(settings), headers=bearer(api_key(settings))) as test_client:
        yield test_client


@pytest.mark.slow
def test_a_grader_error_with_a_nul_fails_the_job_with_a_readable_reason(
    worker_client, redis_worker, tiny_model
) -> None:
    client = worker_client
    dataset_id = upload(client).json()["id"]
    spec = job_spec(
        dataset_id,
        str(tiny_model),
        reward=[{"type": "python_grader", "name": "nul", "source": NUL_GRADER, "timeout_s": 60}],
        hyperparameters={"max_steps": 6, "max_reward_error_steps": 2, "checkpoint_every": 0},
    )
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = wait_until_ended(client, response.json()["id"], timeout=240)
    reason = job["failure_reason"]
    assert job["status"] == "failed", (job, redis_worker.log()[-3000:])
    assert "reward 'nul' failed on every completion for 2 steps" in reason, reason
    assert f"bad{REPLACEMENT}byte" in reason, reason
    assert "internal error" not in reason and "INSERT" not in reason and "Traceback" not in reason
    messages = [
        e["message"]
        for e in client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    ]
    assert any(f"bad{REPLACEMENT}byte" in message for message in messages), messages
