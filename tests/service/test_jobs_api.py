"""POST/GET /v1/jobs and cancel on PostgreSQL: every check happens before anything is queued."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from jobs.db import transaction
from jobs.models import Job, JobStatus
from jobs.queries import append_metrics, claim_job, finish_job
from jobs.submission import run_config_for
from tests.service.factories import api_key, bearer, job_spec, upload
from trainer.config import GRPOConfig, OperatorPolicy
from trainer.rewards import validate_reward_specs


@pytest.fixture
def dataset_id(client) -> str:
    return upload(client).json()["id"]


def count_jobs(settings) -> int:
    with transaction(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_create_queues_the_job_and_sends_it_after_commit(client, settings, sent, dataset_id) -> None:
    response = client.post("/v1/jobs", json=job_spec(dataset_id, hyperparameters={"max_steps": 7}))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_") and job["status"] == "queued"
    assert (job["step"], job["max_steps"], job["group_size"], job["attempts"]) == (0, 7, 2, 0)
    assert job["latest_metrics"] is None and job["failure_reason"] is None
    assert sent == [job["id"]]
    with transaction(settings.database_url) as session:
        assert session.get(Job, job["id"]).sent_at is not None
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_group_size_may_come_with_the_hyperparameters(client, dataset_id) -> None:
    spec = job_spec(dataset_id, hyperparameters={"group_size": 3})
    del spec["group_size"]
    job = client.post("/v1/jobs", json=spec).json()
    assert job["group_size"] == job["hyperparameters"]["group_size"] == 3


def test_the_job_is_stored_and_shown_with_every_hyperparameter_it_runs_with(
    client, settings, dataset_id
) -> None:
    """The posted values, the defaults of the rest, the rewards normalised (like OpenAI's resolved
    hyperparameters); ``group_size`` once, inside them, however the request spelled it. The run
    and the columns are read from that one stored spec."""
    spec = job_spec(dataset_id, hyperparameters={"max_steps": 7})  # group_size at the top level
    job = client.post("/v1/jobs", json=spec).json()
    resolved = {**GRPOConfig().to_dict(), **spec["hyperparameters"], "group_size": 2}
    assert job["hyperparameters"] == resolved and job["hyperparameters"]["beta"] == GRPOConfig().beta
    assert job["reward"] == validate_reward_specs(spec["reward"])
    assert [r["name"] for r in job["reward"]] == ["exact_match", "regex"]
    with transaction(settings.database_url) as session:
        stored = session.get(Job, job["id"])
        assert stored.spec == {
            "name": "test-job",
            "base_model": "org/model",
            "dataset_id": dataset_id,
            "eval_dataset_id": None,
            "reward": job["reward"],
            "hyperparameters": resolved,
            "gpus": 1,
            "webhook_url": None,
        }
        assert (stored.max_steps, stored.name, stored.dataset_id) == (7, "test-job", dataset_id)
        run = run_config_for(stored, settings)
    assert run.hyperparameters == GRPOConfig.from_dict(resolved) and run.reward == job["reward"]


def test_a_local_model_directory_is_accepted(client, dataset_id, tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert client.post("/v1/jobs", json=job_spec(dataset_id, base_model=str(tmp_path))).status_code == 201


@pytest.mark.parametrize(
    ("change", "status", "param", "says"),
    [
        ({"group_size": 1}, 422, "group_size", ">= 2"),
        ({"reward": [{"type": "telepathy"}]}, 422, "reward[0].type", "unknown reward type"),
        ({"reward": [{"type": "regex"}]}, 422, "reward[0].pattern", ""),
        ({"reward": [{"type": "exact_match", "field": "solution"}]}, 422, "reward", "'solution'"),
        ({"reward": []}, 422, "reward", ""),
        ({"base_model": "/no/such/model"}, 422, "base_model", "GRPO_MODEL_DIRS"),
        ({"base_model": "./relative/missing"}, 422, "base_model", "GRPO_MODEL_DIRS"),
        ({"base_model": "not a model id!"}, 422, "base_model", "hub id"),
        ({"hyperparameters": {"max_steps": 0}}, 422, "hyperparameters.max_steps", ">= 1"),
        ({"hyperparameters": {"loss_type": "magic"}}, 422, "hyperparameters.loss_type", "expected one of"),
        (
            {"hyperparameters": {"warp_factor": 9}},
            422,
            "hyperparameters.warp_factor",
            "unknown hyperparameter",
        ),
        ({"hyperparameters": {"lora": {"r": 0}}}, 422, "hyperparameters.lora.r", ""),
        ({"dataset_id": "ds_missing"}, 404, "dataset_id", "no dataset"),
        ({"eval_dataset_id": "ds_missing"}, 404, "eval_dataset_id", "no dataset"),
        ({"group_size": "many"}, 422, "group_size", "integer"),
        ({"colour": "blue"}, 422, "colour", "Extra inputs"),
        ({"webhook_url": "not a url"}, 422, "webhook_url", "URL"),
        (
            {"reward": [{"type": "http", "url": "http://127.0.0.1:9000/score"}]},
            422,
            "reward[0].url",
            (
                "is a loopback address; the operator may allow it by listing '127.0.0.1' "
                "in GRPO_ALLOW_PRIVATE_HOSTS"
            ),
        ),
        (
            {
                "reward": [
                    {"type": "http", "url": "https://scorer.example.com/", "allowed_hosts": ["10.0.0.1"]}
                ]
            },
            422,
            "reward[0].allowed_hosts",
            "is an operator setting, not a reward option",
        ),
        (
            {"reward": [{"type": "code_tests", "allow_network": True}]},
            422,
            "reward[0].allow_network",
            "GRPO_SANDBOX_ALLOW_NETWORK",
        ),
    ],
)
def test_bad_specs_are_refused_and_nothing_is_created(
    client, settings, sent, dataset_id, change, status, param, says
) -> None:
    response = client.post("/v1/jobs", json={**job_spec(dataset_id), **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert count_jobs(settings) == 0 and sent == []


def test_a_missing_field_is_422_and_json_that_does_not_parse_400(client, sent) -> None:
    """A body that cannot be read is a 400 whatever the reason (README: not UTF-8 was one, and
    malformed JSON was a 422 beside it); a body read and found wanting, a 422 naming the field."""
    response = client.post("/v1/jobs", json={"dataset_id": "ds_x", "reward": [{"type": "exact_match"}]})
    assert response.status_code == 422 and response.json()["error"]["param"] == "base_model"
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["message"].startswith("the body is not valid JSON")
    assert sent == []


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        # the top level is strict, as the hyperparameters' integers are: "2" was taken, true was 1
        ({"group_size": "2"}, "group_size", "valid integer"),
        ({"group_size": True}, "group_size", "valid integer"),
        ({"group_size": 2.0}, "group_size", "valid integer"),
        # beside a top-level group_size, the hyperparameters' was replaced unread
        (
            {"hyperparameters": {"group_size": float("nan")}},
            "hyperparameters.group_size",
            "must be an integer",
        ),
        ({"hyperparameters": {"group_size": []}}, "hyperparameters.group_size", "must be an integer"),
        (
            {"hyperparameters": {"group_size": "1"}},
            "hyperparameters.group_size",
            "must be an integer, got '1'",
        ),
        ({"hyperparameters": {"group_size": True}}, "hyperparameters.group_size", "must be an integer"),
        ({"hyperparameters": {"group_size": -1}}, "hyperparameters.group_size", "must be >= 2"),
        (
            {"hyperparameters": {"group_size": 4}},
            "hyperparameters.group_size",
            "is 4, but group_size (at the top level) is 2",
        ),
    ],
)
def test_group_size_is_checked_wherever_it_is_written(
    client, settings, sent, dataset_id, change, param, says
):
    spec = job_spec(dataset_id, hyperparameters=change.pop("hyperparameters", {}), **change)
    assert "group_size" in spec  # the factory's top-level one, or the change's
    sent_as = json.dumps(spec).encode()  # NaN as JSON's NaN token, which httpx's json= refuses
    response = client.post("/v1/jobs", content=sent_as, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert count_jobs(settings) == 0 and sent == []
    agreeing = job_spec(dataset_id, hyperparameters={"group_size": 2})  # the same in both places
    assert client.post("/v1/jobs", json=agreeing).json()["hyperparameters"]["group_size"] == 2


def test_idempotency_key_returns_the_first_job_and_refuses_another_body(
    client, settings, sent, dataset_id
) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    first = client.post("/v1/jobs", json=job_spec(dataset_id), headers=headers)
    again = client.post("/v1/jobs", json=job_spec(dataset_id), headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = client.post("/v1/jobs", json=job_spec(dataset_id, name="other"), headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert count_jobs(settings) == 1 and sent == [first.json()["id"]]


def test_a_failed_send_leaves_a_queued_job_for_the_sweeper(settings, dataset_id) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app

    def broker_down(job_id: str) -> None:
        raise ConnectionError("broker down")

    with TestClient(create_app(settings, send=broker_down), headers=bearer(api_key(settings))) as client:
        response = client.post("/v1/jobs", json=job_spec(dataset_id))
    assert response.status_code == 201 and response.json()["status"] == "queued"
    with transaction(settings.database_url) as session:
        assert session.get(Job, response.json()["id"]).sent_at is None


def test_list_filters_by_status_and_paginates(client, settings, dataset_id) -> None:
    ids = [client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"]
    rest = client.get("/v1/jobs", params={"after": ids[1]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    queued = client.get("/v1/jobs", params={"status": "queued"}).json()["data"]
    assert [j["id"] for j in queued] == [ids[2], ids[0]]
    response = client.get("/v1/jobs", params={"status": "sleeping"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "status"


def test_show_has_the_latest_metrics(client, settings, dataset_id) -> None:
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="w")
        append_metrics(session=session, job_id=job_id, step=1, metrics={"reward": 0.5})
        session.get(Job, job_id).step = 1
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["step"], job["attempts"], job["worker"]) == ("running", 1, 1, "w")
    assert job["latest_metrics"] == {"reward": 0.5}
    assert client.get("/v1/jobs").json()["data"][0]["latest_metrics"] == {"reward": 0.5}


def test_unknown_job_is_404(client) -> None:
    for method, path in (
        ("GET", ""),
        ("POST", "/cancel"),
        ("GET", "/metrics"),
        ("GET", "/events"),
        ("GET", "/checkpoints"),
        ("GET", "/checkpoints/1/download"),
    ):
        response = client.request(method, f"/v1/jobs/job_nope{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "job_not_found"


def test_cancel_a_queued_job_ends_it_at_once(client, dataset_id) -> None:
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    job = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"  # idempotent


def test_cancel_a_running_job_asks_it_to_stop(client, settings, dataset_id) -> None:
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="w")
    job = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert job["status"] == "running" and job["cancel_requested"] is True


def test_cancel_a_finished_job_is_409(client, settings, dataset_id) -> None:
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="w")
        finish_job(session=session, job_id=job_id, worker="w", status=JobStatus.succeeded)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_already_finished"


def test_the_operator_settings_let_jobs_reach_what_specs_cannot(client, settings) -> None:
    """Private hosts and a network for code are the operator's to allow, and the workers' runs
    get the settings' allowances (not the spec's, not the trainer's environment)."""
    settings.allow_private_hosts = ["127.0.0.1"]
    settings.sandbox_allow_network = True
    dataset_id = upload(client, [{"prompt": "Write add.", "tests": ["assert add(1, 2) == 3"]}]).json()["id"]
    reward = [
        {"type": "http", "url": "http://127.0.0.1:9000/score"},
        {"type": "code_tests", "allow_network": True, "weight": 0.5},
    ]
    response = client.post("/v1/jobs", json=job_spec(dataset_id, reward=reward))
    assert response.status_code == 201, response.text
    with transaction(settings.database_url) as session:
        run = run_config_for(session.get(Job, response.json()["id"]), settings)
    assert run.policy == OperatorPolicy(
        allow_private_hosts=("127.0.0.1",), sandbox_allow_unisolated=False, sandbox_allow_network=True
    )
