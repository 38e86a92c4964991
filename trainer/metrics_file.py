"""``metrics.jsonl`` in the run's output directory: every step's metrics, evaluation figures
included: the run's own record. TensorBoard and W&B (``trainer.tracking``) get copies a run
survives losing; failing to write this file ends the run."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.errors import TrainingError

log = logging.getLogger(__name__)


class MetricsFile:
    """``metrics.jsonl``: one JSON object per step. On resume, lines past the resumed step are
    dropped, so a replayed step replaces its line instead of duplicating it.

    A last line that is not a step's metrics was cut short (the process killed, or the disk full,
    while it was written): it is dropped, with a warning to ``on_log`` (else the log); its step is
    past any checkpoint, so the resumed run writes it again. Such a line before others is no torn
    write: the file was changed by hand, and a TrainingError names its line."""

    def __init__(self, path: Path, keep_through: int, on_log: Callable[[str, str], None] | None = None):
        self.path = path
        kept = []
        if path.exists():
            lines = [
                (n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), start=1) if line.strip()
            ]
            for index, (number, line) in enumerate(lines):
                step = step_of(line)
                if step is None and index == len(lines) - 1:
                    if keep_through:  # else every line goes anyway
                        message = (
                            f"{path}: dropped its last line {number}, a write cut short when the run "
                            "stopped; that step is trained again"
                        )
                        if on_log is not None:
                            on_log("warning", message)
                        else:
                            log.warning(message)
                    continue
                if step is None:
                    shown = line[:80].decode(errors="replace")
                    raise TrainingError(
                        f"{path}: line {number} is not a step's metrics (a JSON object with an integer "
                        f'"step"): {shown!r}. Remove or repair that line'
                    )
                if step <= keep_through:
                    kept.append(line.decode(errors="replace"))
        path.write_text("".join(line + "\n" for line in kept))

    def append(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def step_of(line: bytes) -> int | None:
    """The ``step`` of one line of the file; None where the line is not a step's metrics."""
    try:
        record: Any = json.loads(line)
    except ValueError:  # invalid JSON or UTF-8
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
