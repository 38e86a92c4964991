"""Errors a run can end with. Each message is written for the person who submitted the job:
what went wrong and what to change."""

from __future__ import annotations


class TrainingError(Exception):
    """A run that cannot go on; ``str(exc)`` is the reason shown to the user."""


class DatasetError(TrainingError, ValueError):
    """A dataset row that cannot be used; ``line`` is 1-based where known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line
        self.reason = message


class ModelLoadError(TrainingError):
    pass


class NonFiniteLossError(TrainingError):
    pass


class OutOfMemoryError(TrainingError):
    pass


class DiskFullError(TrainingError):
    """No room left for a checkpoint; the half-written one is removed, never listed."""


class RewardFailedError(TrainingError):
    """A reward function errored on every completion for ``max_reward_error_steps`` steps in a row."""
