"""``grpo datasets|jobs|rewards`` (typer's CliRunner) against the live API on PostgreSQL. Jobs
progress through a simulated worker (simulate.py): the subject is the command line."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from api.cli import app
from api.main import create_app
from jobs.artifacts import merged_dir
from jobs.models import JobStatus
from jobs.settings import Settings
from tests.service.conftest import REDIS_URL
from tests.service.factories import RUN_ID, api_key, arithmetic_rows, job_spec, jsonl, make_checkpoint
from tests.service.live import serve
from tests.service.simulate import SimulatedWorker


@pytest.fixture(scope="module")
def settings(make_database, tmp_path_factory) -> Settings:
    return Settings(
        data_dir=tmp_path_factory.mktemp("cli"),
        database_url=make_database(),
        broker_url=REDIS_URL,
        broker_key_prefix=f"grpo-test-{RUN_ID}:",
        queue=f"gpu-{RUN_ID}",
    )


@pytest.fixture(scope="module")
def env(settings) -> Iterator[dict[str, str]]:
    with serve(create_app(settings, send=lambda job_id: None)) as url:
        yield {"GRPO_API_URL": url, "GRPO_API_KEY": api_key(settings)}


def grpo(env, *args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args], env=env)


@pytest.fixture(scope="module")
def spec_file(env, tmp_path_factory):
    """A YAML job spec whose dataset was uploaded with `grpo datasets upload`."""
    directory = tmp_path_factory.mktemp("spec")
    (directory / "arith.jsonl").write_bytes(jsonl(arithmetic_rows()))
    uploaded = grpo(env, "datasets", "upload", directory / "arith.jsonl", "--name", "arith")
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.stdout.strip()  # the id alone, for DS=$(grpo datasets upload f)
    assert dataset_id.startswith("ds_") and "16 rows" in uploaded.stderr
    path = directory / "spec.yaml"
    path.write_text(json.dumps(job_spec(dataset_id, hyperparameters={"max_steps": 6}, name="cli-job")))
    return path


def create(env, spec_file) -> str:
    created = grpo(env, "jobs", "create", spec_file)
    assert created.exit_code == 0, created.output
    assert created.stdout.strip().startswith("job_") and "queued" in created.stderr
    return created.stdout.strip()  # the id alone, for JOB=$(grpo jobs create spec)


def test_create_list_show_and_cancel(env, spec_file) -> None:
    job_id = create(env, spec_file)
    assert "queued" in grpo(env, "jobs", "list").output
    listed = grpo(env, "jobs", "list", "--json", "--limit", "1")
    assert [job["id"] for job in json.loads(listed.stdout)] == [job_id]
    narrow = grpo({**env, "COLUMNS": "60"}, "jobs", "list").stdout
    assert "queued" in narrow and "queu…" not in narrow  # the status is never cut short
    shown = grpo(env, "jobs", "show", job_id)
    assert shown.exit_code == 0 and "cli-job" in shown.output and "step 0/6" in shown.output
    assert "gpus 1" in shown.output and "ran on" not in shown.output  # no worker has taken it
    assert json.loads(grpo(env, "jobs", "show", job_id, "--json").output)["id"] == job_id
    cancelled = grpo(env, "jobs", "cancel", job_id)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    assert "arith" in grpo(env, "datasets", "list").output


def test_follow_shows_progress_and_exits_with_the_final_status(env, settings, spec_file, tmp_path) -> None:
    job_id = create(env, spec_file)
    worker = SimulatedWorker(settings, job_id)

    def train() -> None:
        worker.claim()
        for step in range(1, 7):
            time.sleep(0.1)
            worker.step(step)
        worker.checkpoint(6)
        worker.finish()

    thread = threading.Thread(target=train)
    thread.start()
    followed = grpo(env, "jobs", "follow", job_id, "--interval", "0.05")
    thread.join()
    assert followed.exit_code == 0, followed.output
    assert "running on sim@test/1" in followed.output and f"{job_id} succeeded at step 6/6" in followed.output
    # no terminal here (as in CI or under nohup): a line for every step, none skipped between polls
    assert [line.split()[2] for line in followed.output.splitlines() if " step " in line[:14]] == [
        f"{step}/6" for step in range(1, 7)
    ], followed.output

    downloaded = grpo(env, "jobs", "download", job_id, "--dest", tmp_path)
    assert downloaded.exit_code == 0, downloaded.output
    assert (tmp_path / f"{job_id}-step-6" / "config.json").exists()


def test_a_failed_job_exits_1_with_its_reason(env, settings, spec_file) -> None:
    job_id = create(env, spec_file)
    worker = SimulatedWorker(settings, job_id).claim()
    worker.step(1)
    worker.finish(JobStatus.failed, reason="the loss became NaN at step 2; lower the learning rate")
    followed = grpo(env, "jobs", "follow", job_id)
    assert followed.exit_code == 1 and "lower the learning rate" in followed.output


def test_errors_print_the_servers_message_not_a_traceback(env, tmp_path) -> None:
    missing = grpo(env, "jobs", "show", "job_nope")
    assert (missing.exit_code, missing.output) == (1, "error: no job with id 'job_nope'\n")
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"base_model": "org/model", "dataset_id": "ds_nope", "reward": [{"type": "regex"}]})
    )
    refused = grpo(env, "jobs", "create", bad)
    assert refused.exit_code == 1 and "reward[0].pattern" in refused.output
    unauthorized = grpo({**env, "GRPO_API_KEY": "grpo_wrong"}, "jobs", "list")
    assert unauthorized.exit_code == 1 and "invalid API key" in unauthorized.output


def test_rewards_run(env, tmp_path) -> None:
    (tmp_path / "reward.yaml").write_text(
        "reward:\n  - type: exact_match\n  - type: regex\n    pattern: '^<think>'\n"
    )
    (tmp_path / "samples.jsonl").write_bytes(
        jsonl([{"completion": "<think>so</think> 5", "row": {"answer": "5"}}, {"completion": "7", "row": {}}])
    )
    result = grpo(env, "rewards", "run", tmp_path / "reward.yaml", tmp_path / "samples.jsonl")
    assert result.exit_code == 0, result.output
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in result.output.splitlines() if "│" in line
    ]
    assert rows == [["0", "2", "1", "1", "<think>so</think> 5"], ["1", "0", "error", "0", "7"]]
    assert "exact_match: the dataset row has no 'answer' field" in result.output


def test_download_merged_or_adapter(env, settings, spec_file, tmp_path) -> None:
    job_id = create(env, spec_file)
    make_checkpoint(settings, job_id, 4, kind="adapter")
    refused = grpo(env, "jobs", "download", job_id, "--merged", "--dest", tmp_path)
    assert refused.exit_code == 1 and " ".join(refused.output.split()) == (
        f"error: job {job_id} has no merged checkpoint (a LoRA job's is written when it succeeds)"
    )
    merged = merged_dir(settings.job_dir(job_id), 4)  # as the worker leaves it when the job succeeds
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"w" * 64)

    downloaded = grpo(env, "jobs", "download", job_id, "--merged", "--dest", tmp_path)
    assert downloaded.exit_code == 0, downloaded.output
    assert [p.name for p in (tmp_path / f"{job_id}-step-4-merged").iterdir()] == ["model.safetensors"]
    downloaded = grpo(env, "jobs", "download", job_id, "--adapter", "--dest", tmp_path)
    assert downloaded.exit_code == 0, downloaded.output
    assert (tmp_path / f"{job_id}-step-4" / "adapter_config.json").exists()
    both = grpo(env, "jobs", "download", job_id, "--adapter", "--merged")
    assert (both.exit_code, both.output) == (1, "error: give --merged or --adapter, not both\n")


def test_a_yaml_spec_reads_exponent_floats_as_numbers(env, spec_file, tmp_path) -> None:
    """PyYAML alone reads `1e-4` (no decimal point) as a string; the CLI reads floats as YAML 1.2
    does. Quoted, '1e-4' stays a string, and the server says so."""
    dataset_id = json.loads(spec_file.read_text())["dataset_id"]
    spec = (
        f"name: yaml-floats\nbase_model: org/model\ndataset_id: {dataset_id}\ngroup_size: 2\n"
        "reward:\n  - type: exact_match\n"
        "hyperparameters:\n  max_steps: 2\n  learning_rate: {rate}\n  max_grad_norm: {norm}\n"
    )
    (tmp_path / "spec.yaml").write_text(spec.format(rate="1e-4", norm="2.5e0"))
    job_id = create(env, tmp_path / "spec.yaml")
    stored = json.loads(grpo(env, "jobs", "show", job_id, "--json").stdout)["hyperparameters"]
    assert (stored["learning_rate"], stored["max_grad_norm"]) == (0.0001, 2.5)
    assert grpo(env, "jobs", "cancel", job_id).exit_code == 0

    (tmp_path / "quoted.yaml").write_text(spec.format(rate="'1e-4'", norm="1.0"))
    refused = grpo(env, "jobs", "create", tmp_path / "quoted.yaml")
    assert refused.exit_code == 1
    assert "hyperparameters.learning_rate: must be a number, got '1e-4'" in " ".join(refused.output.split())


def test_the_yaml_reader_adds_exponent_floats_and_nothing_else(tmp_path) -> None:
    """Only what YAML 1.1 leaves a string for want of a decimal point changes type."""
    from grpo_client.cli import read_spec

    path = tmp_path / "values.yaml"
    path.write_text("a: 1e-4\nb: -1E+3\nc: 08\nd: 1.10\ne: 12\nf: 2026-12-06\ng: 0x1F\nh: v1e3\ni: '1e3'\n")
    values = read_spec(path)
    assert values["a"] == 0.0001 and values["b"] == -1000.0
    assert values["c"] == "08" and values["d"] == 1.1 and values["e"] == 12 and values["g"] == 31
    assert str(values["f"]) == "2026-12-06" and values["h"] == "v1e3" and values["i"] == "1e3"
