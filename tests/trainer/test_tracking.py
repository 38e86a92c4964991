"""Tracking: TensorBoard event files written by real training runs and read back with
TensorBoard's own reader; W&B off unless the operator configures it, and never required."""

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.trainer.factories import letter_dataset, tiny_run
from trainer.loop import train
from trainer.progress import Progress
from trainer.tracking import TENSORBOARD_DIR, Tracker, WandbOptions

pytestmark = pytest.mark.slow


class Crash(Exception):
    pass


class Logs(Progress):
    def __init__(self, crash_at: int | None = None):
        self.logs, self.crash_at = [], crash_at

    def on_step(self, step, metrics):
        if (
            step == self.crash_at
        ):  # after the step's metrics were written, before its checkpoint: a killed worker
            raise Crash(step)

    def on_log(self, level, message):
        self.logs.append((level, message))


def read_scalars(run_dir):
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metrics_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_step_and_its_eval_metrics_are_read_back_from_tensorboard(tiny_model_dir, tmp_path):
    run = tiny_run(tiny_model_dir, letter_dataset(tmp_path / "data.jsonl"), max_steps=3, eval_every=1)
    run.eval_dataset = str(letter_dataset(tmp_path / "eval.jsonl", n=3))
    train(run, tmp_path / "out")

    scalars, lines = read_scalars(tmp_path / "out"), metrics_lines(tmp_path / "out")
    for name in ("reward", "loss", "kl", "completion_length", "eval/reward", "eval/rewards/regex"):
        assert [step for step, _ in scalars[name]] == [1, 2, 3], name
        assert [value for _, value in scalars[name]] == pytest.approx(
            [line[name] for line in lines], rel=1e-6
        ), name
    assert set(scalars) >= {key for line in lines for key in line if key != "step"}


def test_a_replayed_step_shows_once_after_a_resume(tiny_model_dir, tmp_path):
    """A worker killed after step 3's metrics, with its newest checkpoint at step 2: the next
    attempt replays step 3, and TensorBoard shows each step once, as metrics.jsonl does."""
    run = tiny_run(
        tiny_model_dir,
        letter_dataset(tmp_path / "data.jsonl", n=5),
        max_steps=4,
        checkpoint_every=2,
        keep_last_checkpoints=0,
    )
    with pytest.raises(Crash):
        train(run, tmp_path / "out", Logs(crash_at=3))
    assert [step for step, _ in read_scalars(tmp_path / "out")["reward"]] == [1, 2, 3]
    train(run, tmp_path / "out", resume=True)

    scalars, lines = read_scalars(tmp_path / "out"), metrics_lines(tmp_path / "out")
    assert [step for step, _ in scalars["reward"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["reward"]] == pytest.approx(
        [line["reward"] for line in lines], rel=1e-6
    )


def test_wandb_is_off_by_default_and_a_missing_package_only_warns(tiny_model_dir, tmp_path, monkeypatch):
    from jobs.settings import Settings
    from trainer.__main__ import wandb_from_environ
    from worker.progress import wandb_options

    assert wandb_options(Settings(), job_id="job_x", job_name=None) is None
    assert wandb_from_environ({}) is None
    configured = wandb_options(Settings(wandb_project="grpo-runs"), job_id="job_x", job_name="arith")
    assert (configured.project, configured.run_id, configured.name) == ("grpo-runs", "job_x", "arith")

    monkeypatch.setitem(
        sys.modules, "wandb", None
    )  # `import wandb` raises ImportError, as on a worker without it
    progress = Logs()
    run = tiny_run(tiny_model_dir, letter_dataset(tmp_path / "data.jsonl"), max_steps=2)
    result = train(run, tmp_path / "out", progress, wandb=WandbOptions(project="grpo-runs", mode="offline"))

    assert result.final_step == 2
    assert [step for step, _ in read_scalars(tmp_path / "out")["reward"]] == [1, 2]
    assert any(
        level == "warning" and "wandb package is not installed" in message for level, message in progress.logs
    )


def test_an_unwritable_tensorboard_directory_only_warns(tmp_path):
    (tmp_path / TENSORBOARD_DIR).write_text("a file where the directory should be")
    logs = []
    with Tracker(tmp_path, on_log=lambda level, message: logs.append((level, message))) as tracker:
        tracker.log(1, {"reward": 0.5})
        tracker.log(2, {"reward": 0.7})
    assert len(logs) == 1 and logs[0][0] == "warning" and "TensorBoard" in logs[0][1]
