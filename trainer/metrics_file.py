"""``metrics.jsonl`` in the run's output directory: every step's metrics, evaluation figures
included: the run's own record. TensorBoard and W&B (``trainer.tracking``) get copies a run
survives losing; failing to write this file ends the run."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsFile:
    """``metrics.jsonl``: one JSON object per step. On resume, lines past the resumed step are
    dropped, so a replayed step replaces its line instead of duplicating it."""

    def __init__(self, path: Path, keep_through: int):
        self.path = path
        kept = []
        if path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= keep_through
            ]
        path.write_text("".join(line + "\n" for line in kept))

    def append(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
