"""Datasets: JSONL rows with a ``prompt`` (a string or a list of chat messages) and whatever
fields the rewards read. Standard library only: the service validates uploads with it."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer.errors import DatasetError


def check_row(row: Any, line: int | None = None) -> dict[str, Any]:
    """Return ``row`` if it can be trained on, else raise ``DatasetError`` naming the line."""
    if not isinstance(row, dict):
        raise DatasetError(f"expected a JSON object, got {type(row).__name__}", line)
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DatasetError("'prompt' is empty", line)
    elif isinstance(prompt, list) and prompt:
        for i, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DatasetError(f"'prompt'[{i}] must be a message {{\"role\": ..., \"content\": ...}}", line)
    elif prompt is None:
        raise DatasetError("missing 'prompt' (a string, or a list of chat messages)", line)
    else:
        raise DatasetError("'prompt' must be a non-empty string or a non-empty list of chat messages", line)
    return row


def parse_line(text: str, number: int) -> dict[str, Any] | None:
    """One JSONL line as a checked row; None for a blank line; ``DatasetError`` for a bad one."""
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"not valid JSON ({exc.msg} at column {exc.colno})", number) from None
    return check_row(row, number)


def parse_rows(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Parse JSONL text lines (blank lines skipped); the first bad line raises ``DatasetError``."""
    rows = []
    for number, text in enumerate(lines, start=1):
        row = parse_line(text, number)
        if row is not None:
            rows.append(row)
    if not rows:
        raise DatasetError("the dataset has no rows")
    return rows


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        return parse_rows(f)


class PromptSampler:
    """Draws prompts without replacement, reshuffling each epoch; its state resumes exactly."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def draw(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            if self.position == self.num_rows:
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            indices.append(self._order[self.position])
            self.position += 1
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)
