"""How the outside world watches and steers a run: the CLI, the Celery worker and the tests
each pass their own ``Progress`` to ``train`` and the loop stays the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Progress:
    """No-op base: override what you need. Called from the training loop, between steps."""

    def on_start(self, *, start_step: int, max_steps: int) -> None:
        """The model is loaded and the loop is about to run step ``start_step + 1``."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Step ``step`` (1-based) finished with these metrics."""

    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """A few of the step's prompts, completions and rewards (``num_samples_logged`` of them)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A complete checkpoint of step ``step`` now lies at ``path``."""

    def on_checkpoint_removed(self, step: int) -> None:
        """The checkpoint of step ``step`` was deleted from disk: pruned by ``keep_last_checkpoints``,
        or saved from weights that diverged. The trainer is the only one that deletes checkpoints,
        so a watcher that keeps a list of them mirrors this instead of rescanning the disk."""

    def on_evaluation(self, step: int, figures: dict[str, float], *, best_step: int | None) -> None:
        """The checkpoint of step ``step`` (just reported by ``on_checkpoint``) scored ``figures``
        on the eval set (``reward``, ``pass@k``, ...: the ``eval/`` metrics without their prefix);
        ``best_step`` is the best checkpoint so far by ``keep_best_by`` (None: not set)."""

    def on_log(self, level: str, message: str) -> None:
        """Something a user should read: a warning (reward errors, truncation) or a note."""

    def should_stop(self) -> bool:
        """Asked after every step; True ends the run at this step boundary, after a checkpoint."""
        return False
