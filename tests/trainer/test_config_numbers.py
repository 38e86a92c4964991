"""Numbers a run cannot use are refused by the config itself (the API and ``python -m trainer``
share these checks): NaN and ±Infinity for every float, integers past 32 bits for every int, a
seed the seeding calls would refuse. The field lists come from the dataclasses, so a field added
later is covered."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from tests.trainer.factories import NUMERIC_HYPERPARAMETERS
from trainer.config import MAX_SEED, ConfigError, GRPOConfig
from trainer.rewards import RewardSuite, validate_reward_specs
from trainer.rewards.suite import MAX_ABS_SCORE

FLOATS = [name for name, kind in NUMERIC_HYPERPARAMETERS if kind is float]
INTEGERS = [name for name, kind in NUMERIC_HYPERPARAMETERS if kind is int]


def hyperparameters(name: str, value: object) -> dict[str, object]:
    return {"lora": {name.removeprefix("lora."): value}} if name.startswith("lora.") else {name: value}


def refused(values: dict[str, object]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        GRPOConfig.from_dict(values)
    return caught.value


def test_the_lists_cover_what_the_red_team_found() -> None:
    assert {
        "learning_rate",
        "temperature",
        "beta",
        "epsilon",
        "epsilon_high",
        "weight_decay",
        "max_grad_norm",
        "delta",
        "top_p",
        "adam_beta1",
        "adam_beta2",
        "lora.alpha",
        "lora.dropout",
    } <= set(FLOATS)
    assert {"seed", "group_size", "max_steps", "warmup_steps", "lora.r"} <= set(INTEGERS)


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, 10**400], ids=["NaN", "inf", "-inf", "10**400"]
)
@pytest.mark.parametrize("name", FLOATS)
def test_every_float_must_be_finite(name: str, value: float) -> None:
    error = refused(hyperparameters(name, value))
    assert error.param == f"hyperparameters.{name}" and "finite" in error.message, error


@pytest.mark.parametrize("value", [2**70, -(2**70)])
@pytest.mark.parametrize("name", INTEGERS)
def test_every_integer_fits_32_bits(name: str, value: int) -> None:
    error = refused(hyperparameters(name, value))
    assert error.param == f"hyperparameters.{name}", error


def test_a_seed_is_one_every_seeding_call_takes() -> None:
    assert refused({"seed": 99999999999999999999}).param == "hyperparameters.seed"
    assert refused({"seed": MAX_SEED + 1}).param == "hyperparameters.seed"
    assert (
        refused({"warmup_steps": 2**31}).param == "hyperparameters.warmup_steps"
    )  # other integers stop at 2**31 - 1
    config = GRPOConfig.from_dict({"seed": MAX_SEED})
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.default_rng(config.seed)
    np.random.seed(config.seed)  # the strictest: below 2**32


def test_flags_and_lora_must_have_their_types() -> None:
    assert refused({"dynamic_sampling": "yes"}).param == "hyperparameters.dynamic_sampling"
    assert refused({"lora": 5}).param == "hyperparameters.lora"
    assert refused({"lora": {"target_modules": 5}}).param == "hyperparameters.lora.target_modules"
    assert GRPOConfig.from_dict({"lora": {"alpha": 16.5}}).lora.alpha == 16.5


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"type": "exact_match", "weight": math.nan}, "reward[0].weight"),
        ({"type": "exact_match", "weight": -math.inf}, "reward[0].weight"),
        ({"type": "exact_match", "weight": 10**400}, "reward[0].weight"),
        ({"type": "exact_match", "weight": 1e7}, "reward[0].weight"),
        ({"type": "math", "timeout_s": 2**70}, "reward[0].timeout_s"),
        ({"type": "length", "target": 2**31}, "reward[0].target"),
        ({"type": "http", "url": "https://example.com", "timeout_s": math.inf}, "reward[0].timeout_s"),
    ],
)
def test_reward_options_are_finite_and_bounded(spec: dict[str, object], param: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_reward_specs([spec])
    assert caught.value.param == param


def test_a_score_too_large_to_sum_is_an_error_not_an_infinite_total() -> None:
    source = "def grade(sample, item):\n    return 1e300 if sample['output_text'] == 'a' else 2.0\n"
    with RewardSuite([{"type": "python_grader", "name": "big", "source": source, "weight": 2.0}]) as suite:
        out = suite(["p", "p"], ["a", "b"], [{}, {}])
    assert out.total == [0.0, 4.0] and out.errors == {"big": 1}, out
    assert f"beyond ±{MAX_ABS_SCORE:g}" in out.error_messages[0]
