"""The registry of reward types and the checks a reward spec goes through.

A spec is ``{"type": ..., "weight": 1.0, "name": optional, ...options}``; ``param`` paths in
errors index the list from 0, e.g. ``reward[1].pattern``.
"""

from __future__ import annotations

from typing import Any

from trainer.config import ConfigError, did_you_mean
from trainer.rewards.base import REQUIRED, Option, RewardType, check_option, known
from trainer.rewards.code_tests import CODE_TESTS
from trainer.rewards.graders import PYTHON_GRADER, STRING_CHECK, TEXT_SIMILARITY
from trainer.rewards.model import REWARD_MODEL
from trainer.rewards.remote import HTTP
from trainer.rewards.rules import EXACT_MATCH, LENGTH, MATH, REGEX

REWARD_TYPES: dict[str, RewardType] = {
    "exact_match": EXACT_MATCH,
    "math": MATH,
    "regex": REGEX,
    "length": LENGTH,
    "code_tests": CODE_TESTS,
    "reward_model": REWARD_MODEL,
    "http": HTTP,
    "string_check": STRING_CHECK,
    "text_similarity": TEXT_SIMILARITY,
    "python_grader": PYTHON_GRADER,
}
MAX_WEIGHT = 1e6  # with scores within MAX_ABS_SCORE, a total stays far from a float's overflow
COMMON_OPTIONS = {
    "weight": Option("number", 1.0, minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT),
    "name": Option("string", None),
}
MAX_NAME_LENGTH = 64


def validate_reward_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalised copies of ``specs``: options checked, defaults filled, a unique ``name`` each.

    Raises ConfigError naming the offending ``reward[i].option`` and saying how to fix it.
    """
    if not isinstance(specs, list) or not specs:
        raise ConfigError("reward", 'give a list of reward functions, e.g. [{"type": "exact_match"}]')
    normalised = [_validate_spec(spec, f"reward[{index}]") for index, spec in enumerate(specs)]
    _assign_names(normalised)
    return normalised


def required_fields(specs: list[dict[str, Any]]) -> set[str]:
    """The dataset row fields these rewards read, e.g. ``{"answer"}`` for exact_match."""
    fields: set[str] = set()
    for spec in validate_reward_specs(specs):
        fields |= REWARD_TYPES[spec["type"]].fields(spec)
    return fields


def _validate_spec(spec: Any, param: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ConfigError(param, f'must be an object like {{"type": "exact_match"}}, got {spec!r}')
    kind = spec.get("type")
    if kind is None:
        raise ConfigError(f"{param}.type", f"is required; known types: {known(REWARD_TYPES)}")
    if kind not in REWARD_TYPES:
        raise ConfigError(
            f"{param}.type",
            f"unknown reward type {kind!r}; {did_you_mean(kind, REWARD_TYPES)}"
            f"known types: {known(REWARD_TYPES)}",
        )
    reward_type = REWARD_TYPES[kind]
    options: dict[str, Option] = {**COMMON_OPTIONS, **reward_type.options}
    unknown = sorted(set(spec) - set(options) - {"type"})
    if unknown:
        raise ConfigError(
            f"{param}.{unknown[0]}",
            f"unknown option for a {kind} reward; "
            f"{did_you_mean(unknown[0], options)}its options: {known(['type', *options])}",
        )
    normalised: dict[str, Any] = {"type": kind}
    for key, option in options.items():
        if key in spec:
            normalised[key] = check_option(f"{param}.{key}", option, spec[key])
        elif option.default is REQUIRED:
            example = f", e.g. {option.example}" if option.example else ""
            raise ConfigError(f"{param}.{key}", f"is required for a {kind} reward{example}")
        else:
            normalised[key] = option.default
    name = normalised["name"]
    if name is not None and not (0 < len(name) <= MAX_NAME_LENGTH and name.strip() == name):
        raise ConfigError(
            f"{param}.name",
            f"must be 1 to {MAX_NAME_LENGTH} characters without surrounding spaces, got {name!r}",
        )
    if reward_type.check is not None:
        reward_type.check(normalised, param)
    return normalised


def _assign_names(specs: list[dict[str, Any]]) -> None:
    """Fill missing names with the type, de-duplicated in order: "regex", "regex_2", ..."""
    taken: set[str] = set()
    for index, spec in enumerate(specs):
        if spec["name"] is not None:
            if spec["name"] in taken:
                raise ConfigError(
                    f"reward[{index}].name",
                    f"{spec['name']!r} is used by an earlier reward; give each reward a different name",
                )
            taken.add(spec["name"])
    for spec in specs:
        if spec["name"] is None:
            name, suffix = spec["type"], 2
            while name in taken:
                name, suffix = f"{spec['type']}_{suffix}", suffix + 1
            spec["name"] = name
            taken.add(name)
