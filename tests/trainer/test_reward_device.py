"""A reward model is loaded onto the device the suite is given (the trainer passes its own, a
``torch.device``), the CPU when none is. A CPU test cannot show CUDA: the "meta" device stands for
a device other than the CPU."""

from __future__ import annotations

import math

import torch

from tests.trainer.test_rewards import write_reward_model
from trainer.rewards import RewardSuite


def test_a_reward_model_is_on_the_device_the_suite_is_given(tmp_path) -> None:
    spec = {"type": "reward_model", "model": str(write_reward_model(tmp_path / "rm"))}
    with RewardSuite([spec]) as suite:
        assert next(suite._functions[0].model.parameters()).device == torch.device("cpu")
    with RewardSuite([spec], device=torch.device("meta")) as suite:
        assert next(suite._functions[0].model.parameters()).device == torch.device("meta")
    # the trainer's device, a torch.device rather than a name, scores and closes
    with RewardSuite([spec], device=torch.device("cpu")) as suite:
        scores = suite(["Q:"], [" 4"], [{}]).parts["reward_model"]
        reward_model = suite._functions[0]
        reward_model.close()  # (the suite's close logs a function's failure to close, and goes on)
        assert reward_model.model is None
    assert len(scores) == 1 and math.isfinite(scores[0])
