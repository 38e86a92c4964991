"""The pieces every reward type is made of: its options, how it is built, how it scores.

A reward function takes the batch ``(prompts, completions, rows)`` and returns one entry per
completion: a float, or the exception that completion raised. Raising from the call itself is a
batch-level failure, which the suite counts against every completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import regex

from trainer.config import MAX_INTEGER, ConfigError, OperatorPolicy, did_you_mean, is_finite_number
from trainer.rewards.stop import check_stop

Scores = list[float | Exception]
REQUIRED = object()  # marks an option without a default


class RewardError(ValueError):
    """A completion or row a reward function cannot score; ``str(exc)`` is shown to the user."""


class RewardFunction(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> Scores: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Option:
    """One option of a reward type: its kind, its default, and the values it may take."""

    # "string", "number", "integer", "boolean", "strings" (a list) or "headers" (a str -> str mapping)
    kind: str
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive
    maximum: float | None = None  # inclusive
    example: str = ""  # shown when a required option is missing


@dataclass(frozen=True)
class RewardType:
    """An entry of the registry: the options a spec of this type takes and how to build it.

    ``check(spec, param)`` does the cross-option checks on a spec whose options are already typed;
    ``check_policy(spec, param, policy)`` refuses what the operator's ``OperatorPolicy`` does not
    allow (a non-public URL, a network for code); ``fields(spec)`` names the dataset fields it
    reads; ``build(spec, device=, param=, policy=)`` makes the function (loading a model or opening
    a client where needed).
    """

    options: dict[str, Option]
    build: Callable[..., RewardFunction]
    check: Callable[[dict[str, Any], str], None] | None = None
    check_policy: Callable[[dict[str, Any], str, OperatorPolicy], None] | None = None
    fields: Callable[[dict[str, Any]], set[str]] = field(default=lambda spec: set())
    summary: str = ""


class PerCompletion:
    """Adapts ``score(prompt, completion, row) -> float`` to the batch form, one error per completion."""

    def __init__(self, score: Callable[[str, str, dict[str, Any]], float]):
        self.score = score

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> Scores:
        scores: Scores = []
        for prompt, completion, row in zip(prompts, completions, rows, strict=True):
            check_stop()  # a stopped batch ends here, not after the rest of its completions
            try:
                scores.append(float(self.score(prompt, completion, row)))
            except Exception as exc:  # one bad completion must not sink the batch
                scores.append(exc)
        return scores

    def close(self) -> None:
        pass


def row_value(row: dict[str, Any], name: str) -> Any:
    """``row[name]``, or a RewardError that says which field the dataset lacks."""
    if name not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise RewardError(f"the dataset row has no {name!r} field (its fields: {fields})")
    value = row[name]
    if value is None:
        raise RewardError(f"the dataset row's {name!r} field is null")
    return value


# User patterns run on the ``regex`` engine, the one ``re``-compatible engine with a time limit: a
# pattern that backtracks catastrophically, e.g. "(a|a)+$", would otherwise hold a worker forever.
REGEX_FLAGS = {
    "a": regex.ASCII,
    "i": regex.IGNORECASE,
    "m": regex.MULTILINE,
    "s": regex.DOTALL,
    "x": regex.VERBOSE,
}
PATTERN_TIMEOUT_S = 1.0  # one pattern on one completion; a sane pattern takes microseconds


def compile_pattern(pattern: str, flags: str) -> regex.Pattern[str]:
    """Compile a spec's ``pattern`` with its ``flags`` letters (already validated)."""
    value = 0
    for letter in flags:
        value |= REGEX_FLAGS[letter]
    return regex.compile(pattern, value)


def pattern_timed_out(pattern: regex.Pattern[str]) -> RewardError:
    """The error a completion gets when ``pattern`` ran past PATTERN_TIMEOUT_S on it."""
    shown = pattern.pattern if len(pattern.pattern) <= 60 else pattern.pattern[:57] + "..."
    return RewardError(
        f"the pattern {shown!r} timed out after {PATTERN_TIMEOUT_S:g}s on this completion; "
        "nested repetition such as (a+)+ or (a|a)+ backtracks exponentially, simplify it"
    )


def check_pattern(spec: dict[str, Any], param: str) -> None:
    """ConfigError unless ``spec["flags"]`` are known letters and ``spec["pattern"]`` compiles."""
    unknown = sorted(set(spec["flags"]) - set(REGEX_FLAGS))
    if unknown:
        raise ConfigError(
            f"{param}.flags",
            f"unknown regex flag {unknown[0]!r}; use letters from "
            f"{''.join(REGEX_FLAGS)} (a: ASCII, i: ignore case, m: multiline, "
            "s: dot matches newline, x: verbose)",
        )
    try:
        compile_pattern(spec["pattern"], spec["flags"])
    except regex.error as exc:
        raise ConfigError(
            f"{param}.pattern",
            f"is not a valid regular expression ({exc}); fix it or escape "
            "special characters with a backslash",
        ) from None


def check_option(param: str, option: Option, value: Any) -> Any:
    """The value, normalised (numbers of kind "number" become floats), or a ConfigError."""
    if value is None and option.default is None:
        return None
    kind = option.kind
    if kind == "number":  # the run config's own rule: finite, and within what a float holds
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(param, f"must be a number, got {value!r}")
        if not is_finite_number(value):
            raise ConfigError(param, f"must be a finite number, got {value!r}")
        value = float(value)
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(param, f"must be an integer, got {value!r}")
        if abs(value) > MAX_INTEGER:
            raise ConfigError(param, f"must be between -{MAX_INTEGER} and {MAX_INTEGER}, got {value!r}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise ConfigError(param, f"must be true or false, got {value!r}")
    elif kind == "string":
        if not isinstance(value, str):
            raise ConfigError(param, f"must be a string, got {value!r}")
    elif kind == "strings":
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(param, f'must be a list of strings, e.g. ["127.0.0.1"], got {value!r}')
        value = list(value)
    elif kind == "headers":
        if not isinstance(value, dict) or not all(
            isinstance(item, str) for pair in value.items() for item in pair
        ):
            raise ConfigError(param, 'must be an object of strings, e.g. {"Authorization": "Bearer ..."}')
        value = dict(value)
    else:  # pragma: no cover - a mistake in a registry entry
        raise AssertionError(f"unknown option kind {kind!r}")
    if option.choices and value not in option.choices:
        raise ConfigError(
            param,
            f"unknown value {value!r}; {did_you_mean(value, option.choices)}"
            f"expected one of {', '.join(option.choices)}",
        )
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(param, f"must be >= {option.minimum:g}, got {value!r}")
    if option.above is not None and value <= option.above:
        raise ConfigError(param, f"must be > {option.above:g}, got {value!r}")
    if option.maximum is not None and value > option.maximum:
        raise ConfigError(param, f"must be <= {option.maximum:g}, got {value!r}")
    return value


def known(names: Sequence[str]) -> str:
    return ", ".join(sorted(names))
