"""Reward functions: a registry keyed by ``type``, spec validation, and the suite that combines them.

Importing this package needs neither torch nor transformers (the web service validates specs
with it); a ``reward_model`` reward imports them when it is built.

    suite = RewardSuite([{"type": "exact_match"}, {"type": "regex", "pattern": "^<think>", "weight": 0.2}])
    out = suite(prompts, completions, rows)   # out.total, out.parts, out.errors, out.error_messages
"""

from trainer.rewards.base import RewardError
from trainer.rewards.registry import REWARD_TYPES, required_fields, validate_reward_specs
from trainer.rewards.suite import RewardOutput, RewardSuite, check_operator_policy

__all__ = [
    "REWARD_TYPES",
    "RewardError",
    "RewardOutput",
    "RewardSuite",
    "check_operator_policy",
    "required_fields",
    "validate_reward_specs",
]
