"""``grpo datasets|jobs|rewards`` (typer's CliRunner) against the live API on PostgreSQL. Jobs
progress through a simulated worker (simulate.py): the subject is the command line."""

from __future__ import annotations

import json
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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


def test_download_merged_of_a_full_fine_tune_prints_the_directory_it_wrote(
    env, settings, spec_file, tmp_path
):
    """A full fine-tune has no merged form: the server sends its checkpoint, `<job>-step-N/`, and
    what is printed (and the tar's name) is what the archive holds, not `<job>-step-N-merged`."""
    job_id = create(env, spec_file)
    make_checkpoint(settings, job_id, 3)
    downloaded = grpo(env, "jobs", "download", job_id, "--merged", "--dest", tmp_path / "dir")
    assert downloaded.exit_code == 0, downloaded.output
    printed = Path(downloaded.stdout.strip())
    assert printed == tmp_path / "dir" / f"{job_id}-step-3" and (printed / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == [f"{job_id}-step-3"]

    kept = grpo(env, "jobs", "download", job_id, "--merged", "--tar", "--dest", tmp_path / "tar")
    assert kept.exit_code == 0, kept.output
    printed = Path(kept.stdout.strip())
    assert printed == tmp_path / "tar" / f"{job_id}-step-3.tar"
    with tarfile.open(printed) as archive:
        assert {name.split("/")[0] for name in archive.getnames()} == {f"{job_id}-step-3"}
    assert [p.name for p in (tmp_path / "tar").iterdir()] == [printed.name]


def test_a_download_it_cannot_write_is_one_line_and_exit_2(env, settings, spec_file, tmp_path) -> None:
    """No traceback (the OSError's path and reason instead), the exit code of a bad option, and
    nothing partial left behind."""
    job_id = create(env, spec_file)
    make_checkpoint(settings, job_id, 2)

    def refused(dest: Path, *options: str) -> str:
        result = grpo(env, "jobs", "download", job_id, "--dest", dest, *options)
        assert result.exit_code == 2 and result.stdout == "", result.output
        assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.output
        return result.stderr.rstrip("\n")

    assert refused(Path("/proc/nope")) == "error: /proc/nope: No such file or directory"
    (tmp_path / "a-file").write_text("x")  # --dest is a file
    assert refused(tmp_path / "a-file") == f"error: {tmp_path / 'a-file'}: File exists"

    dest = tmp_path / "dest"  # a file where the checkpoint's directory goes
    dest.mkdir()
    (dest / f"{job_id}-step-2").write_text("mine")
    assert refused(dest) == (
        f"error: {dest / f'{job_id}-step-2'}: is in the way of the checkpoint's directory; move or delete it"
    )
    (dest / f"{job_id}-step-2.tar").mkdir()  # a directory where the tar goes
    assert (
        refused(dest, "--tar")
        == f"error: {dest / f'{job_id}-step-2.tar'}: is a directory, in the way of the tar"
    )
    # nothing partial (.tar.part, a half-extracted directory) is left, and what was there is untouched
    assert sorted(p.name for p in dest.iterdir()) == [f"{job_id}-step-2", f"{job_id}-step-2.tar"]
    assert (dest / f"{job_id}-step-2").read_text() == "mine"

    (dest / f"{job_id}-step-2").unlink()
    for _ in range(2):  # an earlier download of the checkpoint is replaced whole
        downloaded = grpo(env, "jobs", "download", job_id, "--dest", dest)
        assert downloaded.exit_code == 0, downloaded.output
    assert sorted(p.name for p in dest.iterdir()) == [f"{job_id}-step-2", f"{job_id}-step-2.tar"]
    assert (dest / f"{job_id}-step-2" / "config.json").is_file()


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_jobs_list_keeps_id_name_status_and_reward_at_80_columns(env, settings, spec_file) -> None:
    """An 80-column terminal leaves out the least needed columns rather than squeezing the name
    and the reward to nothing; piped, every column comes whole, whatever COLUMNS says."""
    dataset_id = json.loads(spec_file.read_text())["dataset_id"]
    long_name = "a-rather-long-job-name-" + "x" * 40
    path = spec_file.parent / "long-name.yaml"
    path.write_text(json.dumps(job_spec(dataset_id, hyperparameters={"max_steps": 6}, name=long_name)))
    job_id = create(env, path)
    worker = SimulatedWorker(settings, job_id).claim()
    worker.step(1)
    reward = json.loads(grpo(env, "jobs", "show", job_id, "--json").stdout)["latest_metrics"]["reward"]

    terminal = grpo({**env, "COLUMNS": "80", "TTY_COMPATIBLE": "1"}, "jobs", "list")
    assert terminal.exit_code == 0, terminal.output
    lines = ANSI.sub("", terminal.stdout).splitlines()
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    header = next(line for line in lines if " id " in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["id", "name", "status", "step", "reward"]
    row = next(index for index, line in enumerate(lines) if job_id in line)
    assert "running" in lines[row] and "1/6" in lines[row] and f"{reward:.3f}" in lines[row]
    names = "".join(line.split("│")[2].strip() for line in lines[row:] if "│" in line)  # wrapped, not cut
    assert names.startswith(long_name)

    piped = grpo({**env, "COLUMNS": "80"}, "jobs", "list")
    assert piped.exit_code == 0, piped.output
    [line] = [line for line in piped.stdout.splitlines() if job_id in line]
    assert long_name in line and "running" in line and f"{reward:.3f}" in line and "1/6" in line
    assert " created " in piped.stdout
    worker.finish(JobStatus.cancelled)


def test_follow_without_a_terminal_prints_in_the_order_things_happened(env, settings, spec_file) -> None:
    """A job that ended between two polls: its last steps come before its end, and no frame of
    a progress bar is printed."""
    job_id = create(env, spec_file)
    SimulatedWorker(settings, job_id).run(6)  # all of it before the first poll
    followed = grpo(env, "jobs", "follow", job_id)
    assert followed.exit_code == 0, followed.output
    lines = followed.stdout.splitlines()  # one a step or event (a log's lines are not wrapped)
    # "12:00:01 running on sim@test/1 (…)", "12:00:01 step 3/6  reward …": what each line is
    order = [line.split()[2] if line.split()[1] == "step" else line.split()[1] for line in lines[:-1]]
    assert order == ["queued", "running", *(f"{step}/6" for step in range(1, 7)), "succeeded"], (
        followed.output
    )
    assert lines[-1] == f"{job_id} succeeded at step 6/6"
    assert "━" not in followed.output  # the bar's last frame
