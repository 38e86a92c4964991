"""Evaluation that chooses, on the production setup: the API served on loopback, PostgreSQL,
Redis and a real Celery worker training the tiny model with an eval set. Every checkpoint carries
its eval figures, the best one by ``keep_best_by`` outlives ``keep_last_checkpoints`` and is what
the client downloads by default, and a warning says when training and eval rewards part ways.

The rewards come from an ``http`` scoring endpoint on loopback that makes the story certain
whatever the tiny model writes: a training completion earns 0.1 per training batch scored so far
(the training reward rises step after step), an eval completion 1.0 minus that (the eval reward
falls at every evaluation)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from api.cli import app
from api.main import create_app
from grpo_client import Client
from tests.service.e2e import wait_until_ended
from tests.service.factories import api_key, bearer, job_spec, jsonl
from tests.service.http_stub import LoopbackEndpoint
from tests.service.live import serve
from trainer.checkpoint import checkpoints_on_disk

pytestmark = pytest.mark.slow


class DivergingRewards(LoopbackEndpoint):
    """``{"rewards": [...]}`` for the rows' ``split``: training rises, eval falls."""

    def __init__(self) -> None:
        self.training_batches = 0
        super().__init__()

    def answer(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, Any]]:
        return 200, {"rewards": self.score(json.loads(body)["rows"])}

    def score(self, rows: list[dict[str, Any]]) -> list[float]:
        if rows[0]["split"] == "train":  # one batch per step (no dynamic sampling)
            self.training_batches += 1
            return [round(0.1 * self.training_batches, 6)] * len(rows)
        return [round(1.0 - 0.1 * self.training_batches, 6)] * len(rows)


@pytest.fixture(scope="module")
def server(redis_worker_settings, redis_worker) -> Iterator[str]:
    with serve(create_app(redis_worker_settings)) as url:  # sends jobs to Redis, where the worker takes them
        yield url


@pytest.fixture(scope="module")
def scorer() -> Iterator[DivergingRewards]:
    scorer = DivergingRewards()
    yield scorer
    scorer.close()


def upload(http: httpx.Client, rows: list[dict[str, Any]], name: str) -> str:
    response = http.post("/v1/datasets", files={"file": (name, jsonl(rows), "application/jsonl")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_checkpoints_carry_eval_figures_the_best_is_kept_and_downloaded_by_default(
    server, redis_worker, redis_worker_settings, scorer, tiny_model, tmp_path
) -> None:
    key = api_key(redis_worker_settings)
    with httpx.Client(base_url=server, headers=bearer(key), timeout=30) as http:
        train_id = upload(
            http, [{"prompt": f"What is {i} + 1?", "split": "train"} for i in range(8)], "train.jsonl"
        )
        eval_id = upload(
            http, [{"prompt": f"What is {i} + 2?", "split": "eval"} for i in range(3)], "eval.jsonl"
        )

        spec = job_spec(
            train_id,
            str(tiny_model),
            eval_dataset_id=eval_id,
            reward=[{"type": "http", "url": scorer.url, "retries": 0}],
            hyperparameters={
                "max_steps": 4,
                "checkpoint_every": 1,
                "keep_last_checkpoints": 1,
                "keep_best_by": "eval/reward",
                "eval_pass_k": 2,
                "eval_pass_threshold": 0.75,
            },
        )
        created = http.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        try:
            job = wait_until_ended(http, job_id, timeout=600)  # a generous bound for a loaded 2-core CI
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; job {http.get(f'/v1/jobs/{job_id}').json()}; worker log {redis_worker.log()[-3000:]}"
            ) from None
        assert job["status"] == "succeeded", (job, redis_worker.log()[-3000:])

        # eval reward 0.9, 0.8, 0.7, 0.6 after steps 1-4: step 1 is best, and outlives keep_last_checkpoints=1
        assert job["best_checkpoint_step"] == 1
        checkpoints = http.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        assert [(c["step"], c["best"]) for c in checkpoints] == [(1, True), (4, False)]
        on_disk = checkpoints_on_disk(redis_worker_settings.job_dir(job_id))
        assert [step for step, _ in on_disk] == [1, 4]  # the listing is what pruning left
        assert [c["eval"]["reward"] for c in checkpoints] == pytest.approx([0.9, 0.6])
        assert [(c["eval"]["pass@1"], c["eval"]["pass@2"]) for c in checkpoints] == [(1.0, 1.0), (0.0, 0.0)]
        assert all(c["eval"]["rows"] == 3 for c in checkpoints)
        metrics = {m["step"]: m["metrics"] for m in http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]}
        assert [metrics[step]["eval/reward"] for step in (1, 2, 3, 4)] == pytest.approx([0.9, 0.8, 0.7, 0.6])

        events = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        evaluations = [e for e in events if e["kind"] == "evaluation"]
        assert [e["data"]["step"] for e in evaluations] == [1, 2, 3, 4]
        assert all(e["data"]["best_step"] == 1 for e in evaluations)
        warnings = [e["message"] for e in events if e["level"] == "warning" and "overfitting" in e["message"]]
        assert len(warnings) == 1 and warnings[0].startswith("step 3:"), (
            warnings
        )  # once, when 3 evaluations fell

    with Client(server, key) as grpo:
        assert grpo.jobs.default_checkpoint(job_id) == 1
        assert grpo.jobs.newest_checkpoint(job_id) == 4
        downloaded = grpo.jobs.download(job_id, dest=tmp_path)
        assert downloaded == tmp_path / f"{job_id}-step-1" and (downloaded / "config.json").is_file()

    listed = CliRunner().invoke(
        app,
        ["jobs", "checkpoints", job_id],
        env={"GRPO_API_URL": server, "GRPO_API_KEY": key},
        terminal_width=200,
    )
    assert listed.exit_code == 0, listed.output
    cells = [line.replace("│", " ").replace("┃", " ").split() for line in listed.stdout.splitlines()]
    rows = [row for row in cells if row and row[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "4"] and rows[0][-1] == "best" and rows[1][-1] != "best"
    assert "eval reward" in listed.stdout and "0.900" in rows[0]


def test_keep_best_by_without_an_eval_set_is_refused_before_queueing(
    server, redis_worker_settings, tiny_model
) -> None:
    with httpx.Client(base_url=server, headers=bearer(api_key(redis_worker_settings)), timeout=30) as http:
        train_id = upload(http, [{"prompt": "What is 1 + 1?", "answer": "2"}], "one.jsonl")
        refused = http.post(
            "/v1/jobs",
            json=job_spec(train_id, str(tiny_model), hyperparameters={"keep_best_by": "eval/reward"}),
        )
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["param"] == "hyperparameters.keep_best_by" and "eval dataset" in error["message"]
        unknown = http.post(
            "/v1/jobs",
            json=job_spec(train_id, str(tiny_model), hyperparameters={"keep_best_by": "eval/pass@4"}),
        )
        assert unknown.status_code == 422 and "eval_pass_k" in unknown.json()["error"]["message"]
