"""A resume against a spec that differs from the checkpoint's: refused where it would be another run
(naming the field), warned and applied where it only changes how the run goes on; and the figures a
step reports: the learning rate it trained at, entropy and clip ratios over what it trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.factories import letter_dataset, tiny_run, write_rows
from trainer.config import ConfigError, GRPOConfig, LoraConfig, RunConfig
from trainer.loop import train
from trainer.progress import Progress
from trainer.resume import check_resumable

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = "step-000002"


class Recorder(Progress):
    def __init__(self, stop_after: int | None = None):
        self.steps, self.logs, self.stop_after = [], [], stop_after

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_log(self, level, message):
        self.logs.append((level, message))

    def should_stop(self):
        return self.stop_after is not None and len(self.steps) >= self.stop_after


def _run(**hyperparameters) -> RunConfig:
    return RunConfig(
        base_model="/models/tiny",
        dataset="/data/train.jsonl",
        reward=[{"type": "regex", "pattern": "a", "score": "fraction"}],
        hyperparameters=GRPOConfig(**{"group_size": 4, "prompts_per_step": 2, **hyperparameters}),
    )


def _saved(run: RunConfig, rows: int = 16, position: int = 4) -> dict:
    """What state.json holds for a checkpoint of ``run`` (step and all)."""
    return {
        "step": 2,
        "sampler": {"epoch": 0, "position": position},
        "config": run.to_spec(),
        "dataset_rows": rows,
    }


# --- what a resume may change (no model) ------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("group_size", {"group_size": 3}),
        ("prompts_per_step", {"prompts_per_step": 3}),
        ("seed", {"seed": 1}),
        ("dtype", {"dtype": "bfloat16"}),
    ],
)
def test_a_resume_that_changes_the_batch_the_seed_or_the_dtype_is_refused_naming_the_field(field, change):
    with pytest.raises(ConfigError) as refused:
        check_resumable(_saved(_run()), _run(**change), 16, CHECKPOINT)
    assert refused.value.param == f"hyperparameters.{field}"
    message = str(refused.value)
    assert "\n" not in message
    assert f"is {change[field]}," in message or f'is "{change[field]}",' in message
    assert CHECKPOINT in message and "--overwrite" in message and "--output" in message


def test_a_resume_on_another_model_or_a_dataset_of_another_size_is_refused():
    other_model = _run()
    other_model.base_model = "/models/other"
    with pytest.raises(ConfigError, match='^base_model: is "/models/other", but checkpoint step-000002 was'):
        check_resumable(_saved(_run()), other_model, 16, CHECKPOINT)
    with pytest.raises(
        ConfigError, match="^dataset: has 5 rows, but checkpoint step-000002 was trained on a dataset of 16"
    ):
        check_resumable(_saved(_run(), rows=16), _run(), 5, CHECKPOINT)
    with pytest.raises(ConfigError, match="^dataset: has 17 rows"):  # more rows reshuffle the prompt order
        check_resumable(_saved(_run(), rows=16), _run(), 17, CHECKPOINT)


def test_a_resume_that_turns_lora_on_or_off_or_reshapes_it_is_refused():
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(
        ConfigError, match="^hyperparameters.lora: asks for LoRA adapters, but .* full fine-tuning"
    ):
        check_resumable(_saved(_run()), _run(lora=lora), 16, CHECKPOINT)
    with pytest.raises(
        ConfigError, match="^hyperparameters.lora: asks for full fine-tuning, but .* LoRA adapters"
    ):
        check_resumable(_saved(_run(lora=lora)), _run(), 16, CHECKPOINT)
    with pytest.raises(ConfigError, match="^hyperparameters.lora.r: is 8, but"):
        check_resumable(
            _saved(_run(lora=lora)),
            _run(lora=LoraConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"])),
            16,
            CHECKPOINT,
        )
    with pytest.raises(ConfigError, match="^hyperparameters.lora.target_modules"):
        check_resumable(_saved(_run(lora=lora)), _run(lora=LoraConfig(r=4, alpha=8)), 16, CHECKPOINT)
    # the same modules in another order are the same adapters; alpha scales them: a warning
    reordered = LoraConfig(r=4, alpha=16, target_modules=["v_proj", "q_proj"])
    assert check_resumable(_saved(_run(lora=lora)), _run(lora=reordered), 16, CHECKPOINT) == [
        "lora.alpha 8 -> 16"
    ]


def test_bookkeeping_changes_silently_and_optimisation_settings_with_a_warning_naming_them():
    saved = _saved(_run(max_steps=10, checkpoint_every=5))
    quiet = _run(
        max_steps=40,  # extend the run
        checkpoint_every=2,
        keep_last_checkpoints=0,
        eval_every=3,
        num_samples_logged=1,
        logprob_chunk_size=64,
    )
    quiet.name, quiet.dataset, quiet.gpus = "renamed", "/elsewhere/train.jsonl", 2  # same rows, moved
    assert check_resumable(saved, quiet, 16, CHECKPOINT) == []
    tuned = _run(max_steps=10, checkpoint_every=5, learning_rate=5e-7, weight_decay=0.1, temperature=0.7)
    assert check_resumable(saved, tuned, 16, CHECKPOINT) == [
        "learning_rate 1e-06 -> 5e-07",
        "weight_decay 0.0 -> 0.1",
        "temperature 1.0 -> 0.7",
    ]
    # under a decaying schedule, a longer run moves every later step's rate
    cosine = _saved(_run(max_steps=10, lr_schedule="cosine"))
    assert check_resumable(cosine, _run(max_steps=20, lr_schedule="cosine"), 16, CHECKPOINT) == [
        "max_steps 10 -> 20 (the cosine schedule now ends there)"
    ]
    rewarded = _run(max_steps=10, checkpoint_every=5)
    rewarded.reward = [{"type": "exact_match"}]
    assert check_resumable(saved, rewarded, 16, CHECKPOINT) == ["reward (its functions or options)"]


def test_a_checkpoint_of_an_older_release_is_compared_on_what_it_recorded():
    assert (
        check_resumable(
            {"step": 2, "sampler": {"epoch": 0, "position": 4}}, _run(group_size=3), 16, CHECKPOINT
        )
        == []
    )
    partial = _saved(_run())
    del partial["dataset_rows"]
    partial["config"] = {
        "base_model": "/models/tiny",
        "hyperparameters": {"group_size": 4, "learning_rate": 1e-6},
    }
    assert (
        check_resumable(partial, _run(seed=7, dtype="float32"), 16, CHECKPOINT) == []
    )  # not recorded: not compared
    with pytest.raises(ConfigError, match="^hyperparameters.group_size"):
        check_resumable(partial, _run(group_size=8), 16, CHECKPOINT)
    # no row count recorded, but its prompt order had gone past the end of a shorter dataset
    with pytest.raises(
        ConfigError, match="^dataset: has 3 rows, but checkpoint step-000002 had drawn 4 prompts"
    ):
        check_resumable(partial, _run(), 3, CHECKPOINT)


# --- resuming real runs ------------------------------------------------------------------------


def _stopped_at_step_2(tmp_path: Path, **hyperparameters) -> tuple[RunConfig, Path]:
    """A run of 4 steps stopped after step 2 (its checkpoint written), and its output directory."""
    run = tiny_run(tmp_path / "tiny", letter_dataset(tmp_path / "data.jsonl"), max_steps=4, **hyperparameters)
    output = tmp_path / "out"
    result = train(run, output, Recorder(stop_after=2))
    assert result.stopped and result.checkpoint.name == CHECKPOINT
    return run, output


@pytest.fixture
def tiny(tiny_model_dir, tmp_path):
    (tmp_path / "tiny").symlink_to(tiny_model_dir)  # the base model as the runs below name it
    return tmp_path


@pytest.mark.slow
def test_resuming_with_fewer_rows_lora_or_another_group_size_fails_before_training(tiny):
    run, output = _stopped_at_step_2(tiny)
    before = (output / "metrics.jsonl").read_text()
    fewer = tiny_run(
        tiny / "tiny", letter_dataset(tiny / "small.jsonl", n=3), max_steps=4
    )  # IndexError at HEAD
    with pytest.raises(ConfigError, match="^dataset: has 3 rows, but checkpoint step-000002 was trained on"):
        train(fewer, output, Recorder(), resume=True)
    with_lora = tiny_run(tiny / "tiny", Path(run.dataset), max_steps=4, lora=LoraConfig(r=4, alpha=8))
    with pytest.raises(
        ConfigError, match="^hyperparameters.lora: asks for LoRA adapters"
    ):  # peft's HFValidationError
        train(with_lora, output, Recorder(), resume=True)
    regrouped = tiny_run(
        tiny / "tiny", Path(run.dataset), max_steps=4, group_size=3
    )  # silently accepted at HEAD
    with pytest.raises(ConfigError, match="^hyperparameters.group_size: is 3, but checkpoint step-000002"):
        train(regrouped, output, Recorder(), resume=True)
    assert (output / "metrics.jsonl").read_text() == before  # nothing trained, nothing rewritten
    assert [p.name for p in (output / "checkpoints").iterdir()] == [CHECKPOINT]


@pytest.mark.slow
def test_a_resume_with_a_new_learning_rate_and_betas_trains_with_them_and_says_so(tiny):
    run, output = _stopped_at_step_2(tiny, learning_rate=1e-3, checkpoint_every=1, keep_last_checkpoints=0)
    changed = tiny_run(
        tiny / "tiny",
        Path(run.dataset),
        max_steps=4,
        learning_rate=2e-4,
        adam_beta2=0.95,
        checkpoint_every=1,
        keep_last_checkpoints=0,
    )
    progress = Recorder()
    train(changed, output, progress, resume=True)
    assert [m["learning_rate"] for _, m in progress.steps] == [2e-4, 2e-4]  # HEAD kept training at 1e-3
    (warning,) = [message for level, message in progress.logs if level == "warning"]
    assert warning == (
        "resuming with settings changed since checkpoint step-000002: learning_rate 0.001 -> 0.0002; "
        "adam_beta2 0.99 -> 0.95; the run trains with the new values from step 3 on"
    )
    saved = torch.load(output / "checkpoints/step-000004/trainer_state/optimizer.pt", weights_only=True)
    (group,) = saved["param_groups"]
    assert (group["lr"], tuple(group["betas"])) == (2e-4, (0.9, 0.95))
    state = json.loads((output / "checkpoints/step-000004/trainer_state/state.json").read_text())
    assert state["dataset_rows"] == 16 and state["config"]["hyperparameters"]["learning_rate"] == 2e-4


@pytest.mark.slow
def test_a_checkpoint_without_a_recorded_config_still_resumes(tiny):
    run, output = _stopped_at_step_2(tiny)
    state_file = output / "checkpoints" / CHECKPOINT / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text())
    state.pop("config"), state.pop("dataset_rows", None)  # as an older release wrote it
    state_file.write_text(json.dumps(state))
    progress = Recorder()
    result = train(run, output, progress, resume=True)
    assert result.final_step == 4 and [step for step, _ in progress.steps] == [3, 4]
    assert not [message for level, message in progress.logs if level == "warning"]


@pytest.mark.slow
def test_every_process_of_a_job_refuses_a_changed_resume(tiny):
    """``--nproc 2``: each process reads the checkpoint and refuses alike, before any trains."""
    run, output = _stopped_at_step_2(tiny)
    spec = tiny / "regrouped.json"
    spec.write_text(
        json.dumps({**run.to_spec(), "hyperparameters": {**run.hyperparameters.to_dict(), "group_size": 2}})
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "run",
            str(spec),
            "--output",
            str(output),
            "--resume",
            "--nproc",
            "2",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    refusal = "error: hyperparameters.group_size: is 2, but checkpoint step-000002 was trained with 4"
    assert done.stderr.count(refusal) == 2, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]


# --- what a step reports ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("num_iterations", "first_two"), [(1, [1 / 11, 2 / 11]), (2, [1.5 / 11, 3.5 / 11])])
def test_the_learning_rate_a_step_reports_is_the_one_it_trained_at(tiny, num_iterations, first_two):
    """Warmup over 10 updates: the first update trains at 1/11 of the rate (trainer.schedule); HEAD
    reported the next update's rate, read after the scheduler had stepped."""
    run = tiny_run(
        tiny / "tiny",
        letter_dataset(tiny / "data.jsonl"),
        max_steps=2,
        learning_rate=1e-3,
        warmup_steps=10,
        num_iterations=num_iterations,
    )
    progress = Recorder()
    train(run, tiny / "out", progress)
    reported = [m["learning_rate"] for _, m in progress.steps]
    assert reported == pytest.approx([1e-3 * f for f in first_two], rel=1e-12)


NEVER = [{"type": "regex", "pattern": "(?!)"}]  # matches nothing: every group's rewards are equal


@pytest.mark.slow
def test_a_step_that_trained_on_nothing_reports_no_entropy_or_clip_ratio(tiny):
    """beta 0: a flat group is not scored. With every group flat, no token was: HEAD reported
    entropy 0 (a collapsed policy, to a reader of the curve) and clip ratios 0."""
    data = write_rows(tiny / "data.jsonl", [{"prompt": f"Say a{i}:"} for i in range(8)])
    run = tiny_run(tiny / "tiny", data, reward=NEVER, max_steps=2, beta=0.0)
    progress = Recorder()
    train(run, tiny / "out", progress)
    lines = [json.loads(line) for line in (tiny / "out" / "metrics.jsonl").read_text().splitlines()]
    for (_, metrics), line in zip(progress.steps, lines, strict=True):
        assert metrics["frac_reward_zero_std"] == 1.0 and metrics["kl"] == 0.0
        for name in ("entropy", "clip_ratio", "clip_ratio/low", "clip_ratio/high"):
            assert name not in metrics and name not in line
    # a step with signal reports the entropy of what it trained on
    signal = tiny_run(
        tiny / "tiny", letter_dataset(tiny / "letters.jsonl"), max_steps=2, beta=0.0, dynamic_sampling=True
    )
    progress = Recorder()
    train(signal, tiny / "signal", progress)
    assert all(m["entropy"] > 1.0 and 0.0 <= m["clip_ratio"] <= 1.0 for _, m in progress.steps)
