"""Experiment tracking: every step's metrics (eval metrics included) as TensorBoard event files
under the run's output directory, always and offline, and to Weights & Biases where the operator
configures it (``wandb`` is an optional dependency, imported only then).

Tracking never ends a run: a tracker that cannot start or write says so once through ``on_log``
and the run goes on without it (``metrics.jsonl`` and the job record stay the source of truth).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # under the run's output directory: `tensorboard --logdir <output>`
WANDB_MODES = ("online", "offline")


@dataclass(frozen=True)
class WandbOptions:
    """Where a run's metrics go in Weights & Biases; the operator's choice, never a job spec's.
    The API key and host come from wandb's own environment (WANDB_API_KEY, WANDB_BASE_URL)."""

    project: str
    entity: str | None = None
    mode: str = "online"  # "offline": wandb writes under the output directory; `wandb sync` uploads later
    run_id: str | None = None  # a resumed run continues the same W&B run (the service passes the job id)
    name: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"unknown wandb mode {self.mode!r}; expected one of {', '.join(WANDB_MODES)}")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are numbers (a bool is not one)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class Tracker:
    """Writes ``log(step, metrics)`` to ``<output_dir>/tensorboard/`` and, with ``wandb``, to W&B.

    Writers open on the first ``log``: a resumed run's first step then purges what an earlier
    attempt wrote at or after it, so a replayed step shows once (as ``metrics.jsonl`` keeps it)."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        config: dict[str, Any] | None = None,
        wandb: WandbOptions | None = None,
        on_log: Callable[[str, str], None] | None = None,
    ):
        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        self.config = config or {}
        self.wandb_options = wandb
        self.on_log = on_log or (lambda level, message: None)
        self._writer: Any = None
        self._wandb_run: Any = None
        self._started = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self, first_step: int) -> None:
        self._started = True
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=first_step)
            if self.config and first_step <= 1:
                self._writer.add_text("config", _as_markdown(self.config), 0)
        except Exception as exc:  # no tensorboard package, an unwritable directory
            log.warning("TensorBoard tracking off: %s", exc)
            self.on_log(
                "warning",
                f"TensorBoard event files are not written ({type(exc).__name__}: {exc}); "
                f"install the tensorboard package on the worker",
            )
        if self.wandb_options is not None:
            self._wandb_run = self._start_wandb(self.wandb_options)

    def _start_wandb(self, options: WandbOptions) -> Any:
        try:
            import wandb
        except ImportError:
            self.on_log(
                "warning",
                "W&B tracking is configured but the wandb package is not installed on this "
                "worker (pip install wandb); metrics go to TensorBoard files only",
            )
            return None
        try:
            return wandb.init(
                project=options.project,
                entity=options.entity,
                mode=options.mode,
                id=options.run_id,
                name=options.name,
                tags=list(options.tags) or None,
                resume="allow" if options.run_id else None,
                config=self.config,
                dir=str(self.log_dir.parent),
            )
        except Exception as exc:  # no key, no network, a refused project: the run goes on without W&B
            log.warning("W&B tracking off: %s", exc, exc_info=True)
            self.on_log(
                "warning",
                f"W&B tracking could not start ({type(exc).__name__}); metrics go to TensorBoard files only",
            )
            return None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` at ``step`` (1-based) in every tracker that is on."""
        if not self._started:
            self._start(step)
        values = scalars(metrics)
        if self._writer is not None:
            try:
                for key, value in values.items():
                    self._writer.add_scalar(key, value, step)
                self._writer.flush()  # a reader (tensorboard, a test) sees each step as it lands
            except Exception as exc:
                self._writer = self._give_up(self._writer, "TensorBoard", exc)
        if self._wandb_run is not None:
            try:
                self._wandb_run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)
            except Exception as exc:
                self._wandb_run = self._give_up(self._wandb_run, "W&B", exc)

    def _give_up(self, writer: Any, name: str, exc: Exception) -> None:
        log.warning("%s tracking stopped: %s", name, exc, exc_info=True)
        self.on_log("warning", f"{name} tracking stopped ({type(exc).__name__}: {exc}); training goes on")
        try:
            writer.close() if name == "TensorBoard" else writer.finish()
        except Exception:
            pass
        return None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish()
            except Exception:
                log.warning("W&B: finishing the run failed", exc_info=True)
            self._wandb_run = None


def _as_markdown(config: dict[str, Any]) -> str:
    import json

    return "```json\n" + json.dumps(config, indent=2, default=str) + "\n```"
