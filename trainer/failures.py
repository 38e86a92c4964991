"""What goes wrong inside a run, turned into a ``TrainingError`` that says what to change.

The loop calls in here at a few points. On the happy path this costs a count of reward errors
per step; everything else runs only once something has failed.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer.batch import ScoredGroups
from trainer.config import GRPOConfig
from trainer.errors import (
    DiskFullError,
    NonFiniteLossError,
    OutOfMemoryError,
    RewardFailedError,
    TrainingError,
)
from trainer.progress import Progress

MB = 1 << 20


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` on a GPU; on a CPU torch's allocator raises a plain RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def is_disk_full(exc: BaseException, directory: Path, needed: int) -> bool:
    """Whether a failed checkpoint write ran out of space. An ``OSError`` says so with its errno
    and safetensors in words, but ``torch.save`` only reports "unexpected pos": then the free
    space left (the half-written checkpoint is already removed) is compared to what it needs."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


def is_non_finite_sampling(exc: BaseException) -> bool:
    """The sampler's refusal of inf or NaN probabilities: the model's outputs are no longer finite."""
    return isinstance(exc, FloatingPointError) or (
        isinstance(exc, RuntimeError) and "probability tensor contains either" in str(exc)
    )


class Failures:
    """One run's failure paths: out of memory, a diverged model, a full disk, a reward that
    keeps failing."""

    def __init__(
        self, config: GRPOConfig, output_dir: Path, policy: torch.nn.Module, progress: Progress | None = None
    ):
        self.config, self.output_dir, self.policy = config, output_dir, policy
        self.progress = progress or Progress()  # told of the diverged checkpoint it removes
        self.failing_reward_steps: dict[str, int] = {}  # per reward function: steps in a row it failed

    @contextmanager
    def during(self, step: int, phase: str) -> Iterator[None]:
        """Around a phase of step ``step``: running out of memory, or sampling from a model whose
        outputs went non-finite, ends the run with a reason."""
        try:
            yield
        except TrainingError:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise self.out_of_memory(step, phase) from exc
            if is_non_finite_sampling(exc):
                raise self.diverged(step, "sampling met inf or NaN probabilities") from exc
            raise

    def out_of_memory(self, step: int, phase: str) -> OutOfMemoryError:
        c = self.config
        return OutOfMemoryError(
            f"out of memory in {phase} at step {step} ({c.prompts_per_step} prompts x {c.group_size} "
            f"completions of up to {c.max_completion_length} tokens): lower prompts_per_step or group_size, "
            "shorten max_completion_length, or turn on LoRA or gradient_checkpointing"
        )

    def non_finite_loss(self, step: int, loss: float, grad_norm: float) -> NonFiniteLossError:
        """The loss or its gradient is inf or NaN; the optimizer step was skipped."""
        return self.diverged(step, f"the loss is non-finite (loss={loss}, grad_norm={grad_norm})")

    def diverged(self, step: int, symptom: str) -> NonFiniteLossError:
        """Step ``step`` ran on the weights the update of step ``step - 1`` made, and they gave
        inf or NaN: a checkpoint of those weights is removed (it would load, and be useless), and
        the newest one left, whose weights went on to train a step cleanly, is named."""
        suspect = self.output_dir / "checkpoints" / ckpt.checkpoint_name(step - 1)
        removed = ""
        if suspect.is_dir():
            removed = f" ({suspect.name}, saved from the weights that diverged, was removed)"
            shutil.rmtree(suspect, ignore_errors=True)
            self.progress.on_checkpoint_removed(step - 1)
        last = ckpt.latest_checkpoint(self.output_dir)
        if last is None:
            kept = f"no good checkpoint was written before it{removed}"
        else:
            kept = f"the last good checkpoint, {last.name}, is kept{removed}"
        return NonFiniteLossError(
            f"training diverged at step {step}: {symptom}; {kept}. Lower learning_rate (it is "
            f"{self.config.learning_rate:g}), keep max_grad_norm set, or use dtype float32"
        )

    @contextmanager
    def saving(self, step: int) -> Iterator[None]:
        """Around writing checkpoint ``step``: a full disk ends the run with the path and sizes.
        (``save_checkpoint`` has already removed the half-written directory by then.)"""
        try:
            yield
        except Exception as exc:
            # the weights saved plus the optimizer's state: AdamW's two moments in float32, and a
            # half-precision weight's float32 master (trainer.optimizer)
            needed = sum(
                p.numel() * (p.element_size() + (12 if p.element_size() < 4 else 8))
                for p in self.policy.parameters()
                if p.requires_grad
            )
            root = self.output_dir / "checkpoints"
            if not is_disk_full(exc, root, needed):
                raise
            free = shutil.disk_usage(root).free
            raise DiskFullError(
                f"disk full while writing the checkpoint of step {step} to "
                f"{root / ckpt.checkpoint_name(step)} ({free / MB:.1f} MB free, "
                f"about {needed / MB:.1f} MB needed); the partial checkpoint was removed. "
                "Free space on that disk, or keep fewer checkpoints (keep_last_checkpoints)"
            ) from exc

    def check_rewards(self, step: int, batch: ScoredGroups) -> None:
        """Fail once a reward function has errored on every completion for
        ``max_reward_error_steps`` steps in a row: an endpoint that is down, a model that cannot
        score. Training on would spend the GPU on a signal that is not there."""
        limit = self.config.max_reward_error_steps
        if not limit:
            return
        for name, scores in batch.parts.items():
            failed = bool(scores) and all(score is None for score in scores)
            self.failing_reward_steps[name] = self.failing_reward_steps.get(name, 0) + 1 if failed else 0
            if self.failing_reward_steps[name] >= limit:
                prefix = f"{name}: "
                last = next(
                    (m.removeprefix(prefix) for m in batch.error_messages if m.startswith(prefix)), "unknown"
                )
                raise RewardFailedError(
                    f"reward {name!r} failed on every completion for {limit} steps in a row (steps "
                    f"{step - limit + 1}-{step}); last error: {last}. Fix the reward or its endpoint, "
                    "or raise max_reward_error_steps (0 turns this check off)"
                )
