"""The trainer's failure paths: each ends a run with a reason that says what to change. (The
service tests run them end to end through a worker; running out of memory is tested here, on a
process with a memory limit, as a container would set one.)"""

import errno
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.factories import letter_dataset
from trainer.batch import ScoredGroups
from trainer.config import ConfigError, GRPOConfig
from trainer.errors import RewardFailedError
from trainer.failures import Failures, is_disk_full
from trainer.progress import Progress

ADDRESS_SPACE = 2 << 30  # bytes: room for python, torch and a tiny model, not for ten million completions


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.slow
def test_running_out_of_memory_fails_the_run_with_what_to_shrink(tiny_model_dir, tmp_path):
    # Ten million completions of one prompt: their key/value cache alone is ~20 GB, and its
    # allocation fails in a process allowed 2 GB (no mock: torch's allocator really refuses).
    spec = {
        "base_model": str(tiny_model_dir),
        "dataset": str(letter_dataset(tmp_path / "data.jsonl")),
        "group_size": 10**7,
        "reward": [{"type": "regex", "pattern": "a"}],
        "hyperparameters": {"max_steps": 1, "prompts_per_step": 1, "max_completion_length": 8},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "run",
            str(tmp_path / "spec.json"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_memory,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        "error: out of memory in generation and scoring at step 1 (1 prompts x 10000000 completions of up to "
        "8 tokens): lower prompts_per_step or group_size, shorten max_completion_length, or turn on LoRA or "
        "gradient_checkpointing"
    ) in done.stderr


def test_a_full_disk_is_recognised_however_the_writer_reports_it(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path, needed=0)
    assert is_disk_full(
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
        tmp_path,
        needed=0,
    )  # safetensors
    wrapped = RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
    )  # torch.save
    assert not is_disk_full(wrapped, tmp_path, needed=1024)  # plenty of room here: something else went wrong
    assert is_disk_full(wrapped, tmp_path, needed=1 << 60)  # no disk has an exabyte free
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path, needed=1024)


def make_checkpoint(output_dir: Path, step: int) -> None:
    state = output_dir / "checkpoints" / f"step-{step:06d}" / "trainer_state"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"step": step}))


class Removals(Progress):
    def __init__(self):
        self.removed = []

    def on_checkpoint_removed(self, step):
        self.removed.append(step)


def test_divergence_removes_the_diverged_weights_checkpoint_and_names_the_last_good_one(tmp_path):
    progress = Removals()
    failures = Failures(GRPOConfig(learning_rate=1e30), tmp_path, torch.nn.Linear(2, 2), progress)
    make_checkpoint(tmp_path, 1)
    make_checkpoint(tmp_path, 2)  # saved after step 2's update, whose weights step 3 found non-finite
    error = failures.diverged(3, "sampling met inf or NaN probabilities")
    assert str(error) == (
        "training diverged at step 3: sampling met inf or NaN probabilities; the last good checkpoint, "
        "step-000001, is kept (step-000002, saved from the weights that diverged, was removed). Lower "
        "learning_rate (it is 1e+30), keep max_grad_norm set, or use dtype float32"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert progress.removed == [2]  # the progress protocol hears of it, as of a pruned one
    fresh = Failures(GRPOConfig(), tmp_path / "fresh", torch.nn.Linear(2, 2), progress)
    assert "no good checkpoint was written before it" in str(fresh.non_finite_loss(1, float("nan"), 1.0))
    failures.diverged(5, "the loss is non-finite")  # no step-000004 on disk: nothing removed, nothing told
    assert progress.removed == [2]


def scored(parts: list[float | None]) -> ScoredGroups:
    errors = sum(part is None for part in parts)
    return ScoredGroups(
        row_indices=[0],
        prompt_ids=[torch.tensor([1])],
        completion_ids=[torch.tensor([2])] * 2,
        prompts=["p"],
        completions=["a", "b"],
        truncated=torch.zeros(2, dtype=torch.bool),
        rewards=torch.zeros(2),
        parts={"scorer": parts},
        errors={"scorer": errors},
        error_messages=["scorer: POST http://scorer/score: answered HTTP 500"] if errors else [],
    )


def test_a_reward_failing_on_every_completion_for_n_steps_in_a_row_ends_the_run(tmp_path):
    failures = Failures(GRPOConfig(max_reward_error_steps=2), tmp_path, torch.nn.Linear(2, 2))
    failures.check_rewards(1, scored([None, None]))
    failures.check_rewards(2, scored([None, 1.0]))  # one completion scored: the count starts again
    failures.check_rewards(3, scored([None, None]))
    with pytest.raises(
        RewardFailedError,
        match=r"reward 'scorer' failed on every completion for 2 steps in a row "
        r"\(steps 3-4\); last error: POST http://scorer/score: answered HTTP 500",
    ):
        failures.check_rewards(4, scored([None, None]))
    never = Failures(GRPOConfig(max_reward_error_steps=0), tmp_path, torch.nn.Linear(2, 2))
    for step in range(1, 10):
        never.check_rewards(step, scored([None, None]))
    with pytest.raises(ConfigError, match="max_reward_error_steps: must be >= 0"):
        GRPOConfig.from_dict({"max_reward_error_steps": -1})
