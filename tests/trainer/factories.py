"""Small factories for trainer tests: datasets and run configs on a tiny model."""

import dataclasses
import json
import typing
from pathlib import Path

from trainer.config import GRPOConfig, LoraConfig, RunConfig


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def letter_dataset(path: Path, n: int = 16) -> Path:
    """Prompts whose reward is the share of the letter 'a' in the completion: a random tiny model
    earns a little of it by chance, so GRPO has signal from the first step."""
    return write_rows(path, [{"prompt": f"Say a{i}:", "answer": "a"} for i in range(n)])


# The most a test may wait on the wall clock for work a limit must stop: generous for a loaded
# 2-core CI. Tests prove a limit fired by counting (the error raised, the work cut off), never by
# how fast it was; this bound only tells "stopped" from "would run for hours".
LOADED_MACHINE_SLACK_S = 30.0

A_SHARE = [{"type": "regex", "pattern": "a", "score": "fraction"}]


def tiny_run(model_dir: Path, dataset: Path, reward=None, **hyperparameters) -> RunConfig:
    defaults = dict(
        group_size=4,
        prompts_per_step=2,
        max_steps=3,
        learning_rate=1e-3,
        max_completion_length=8,
        max_prompt_length=32,
        beta=0.0,
        checkpoint_every=0,
        seed=0,
    )
    defaults.update(hyperparameters)
    return RunConfig(
        base_model=str(model_dir),
        dataset=str(dataset),
        reward=reward or A_SHARE,
        hyperparameters=GRPOConfig(**defaults),
    )


def numeric_fields(config: type, prefix: str = "") -> list[tuple[str, type]]:
    """Every int and float field of a config dataclass, dotted under ``prefix`` (``float | None``
    too; a bool is no int here): tests that range over them cover a field added later."""
    hints = typing.get_type_hints(config)
    fields = []
    for field in dataclasses.fields(config):
        kinds = typing.get_args(hints[field.name]) or (hints[field.name],)
        if float in kinds:
            fields.append((prefix + field.name, float))
        elif int in kinds:
            fields.append((prefix + field.name, int))
    return fields


NUMERIC_HYPERPARAMETERS = numeric_fields(GRPOConfig) + numeric_fields(LoraConfig, "lora.")
