"""The README's `keep_best_by` values are ones the trainer accepts: pass@k is written with its k
(`eval/pass@4` beside `"eval_pass_k": 4`); the literal `eval/pass@k` is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer.config import ConfigError, GRPOConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_choices() -> list[str]:
    """Every `eval/…` value the README's keep_best_by paragraph and table row name, `<k>` as 4."""
    text = README.read_text()
    paragraph = text[text.index('Set `"keep_best_by"') :].split("\n\n")[0]
    row = next(line for line in text.splitlines() if line.startswith("| `keep_best_by` |"))
    found = re.findall(r"`\"?(eval/[^`\"]+)\"?`", paragraph + "\n" + row)
    return sorted({value.replace("<k>", "4") for value in found})


def test_the_readme_names_the_keep_best_by_values_the_trainer_takes() -> None:
    choices = documented_choices()
    assert {"eval/reward", "eval/pass@1", "eval/pass@4"} <= set(choices), choices
    for choice in choices:
        config = GRPOConfig(eval_pass_k=4, keep_best_by=choice)
        assert config.keep_best_by in config.best_metric_choices
    with pytest.raises(ConfigError, match="did you mean 'eval/pass@4'"):
        GRPOConfig(eval_pass_k=4, keep_best_by="eval/pass@k")
