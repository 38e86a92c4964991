"""Rule-based rewards: ``exact_match``, ``math``, ``regex`` and ``length``. User patterns run on
the ``regex`` engine with a time limit (PATTERN_TIMEOUT_S); math-verify runs in child processes
(``math_pool.py``), which bound it on any thread."""

from __future__ import annotations

import importlib.util
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import regex

from trainer.config import ConfigError
from trainer.rewards.base import (
    PATTERN_TIMEOUT_S,
    Option,
    PerCompletion,
    RewardError,
    RewardType,
    check_pattern,
    compile_pattern,
    pattern_timed_out,
    row_value,
)
from trainer.rewards.math_pool import GoldUnreadable, check_math

# A number not glued to a digit or point before it ("5-3" ends in "3", not "-3"), with optional
# thousands separators and decimals.
_NUMBER_IN_TEXT = re.compile(r"(?<![\d.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\d.])[-+]?\.\d+")
_WHOLE_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")
_BOXED = re.compile(r"\\boxed\s*\{")

EXTRACTIONS = ("last_number", "boxed", "after_marker", "regex", "full")


# --- exact_match -------------------------------------------------------------------------------


def last_number(text: str) -> str | None:
    matches = _NUMBER_IN_TEXT.findall(text)
    return matches[-1] if matches else None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}``; nested braces are balanced.

    One pass pairs every brace (a stack), so a completion that repeats "\\boxed{" thousands of
    times costs linear time, not the quadratic of scanning forward from each box."""
    closing: dict[int, int] = {}  # the index of each "{" that closes -> the index of its "}"
    opened: list[int] = []
    for index, char in enumerate(text):
        if char == "{":
            opened.append(index)
        elif char == "}" and opened:
            closing[opened.pop()] = index
    for match in reversed(list(_BOXED.finditer(text))):
        end = closing.get(match.end() - 1)
        if end is not None:
            return text[match.end() : end]
    return None


def after_marker(text: str, marker: str) -> str | None:
    """The rest of the line after the last ``marker``."""
    _, sep, rest = text.rpartition(marker)
    if not sep:
        return None
    line = rest.strip().split("\n", 1)[0].strip()
    return line or None


def as_number(text: str) -> Decimal | None:
    """``text`` as an exact number ("1,234" and "19.0" included), else None."""
    text = text.strip()
    if not _WHOLE_NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid numbers
        return None


def answers_equal(predicted: str, expected: str, *, case_sensitive: bool = False) -> bool:
    """Numeric equality when both sides are numbers, else equality of the normalised text."""
    predicted_number, expected_number = as_number(predicted), as_number(expected)
    if predicted_number is not None and expected_number is not None:
        return predicted_number == expected_number

    def normalise(text: str) -> str:
        text = " ".join(text.split())
        return text if case_sensitive else text.casefold()

    return normalise(predicted) == normalise(expected)


def _check_exact_match(spec: dict[str, Any], param: str) -> None:
    if spec["extract"] == "regex":
        if not spec["pattern"]:
            raise ConfigError(
                f"{param}.pattern",
                "is required when extract is 'regex', e.g. \"answer: (\\\\S+)\" (group 1 is the answer)",
            )
        check_pattern(spec, param)
    elif spec["pattern"] is not None:
        raise ConfigError(
            f"{param}.pattern", "is only used with extract: 'regex'; set extract to 'regex' or remove pattern"
        )
    if spec["extract"] == "after_marker" and not spec["marker"]:
        raise ConfigError(f"{param}.marker", 'must not be empty, e.g. "####"')


def _build_exact_match(spec: dict[str, Any], **_: Any) -> PerCompletion:
    mode, field_name = spec["extract"], spec["field"]
    pattern = compile_pattern(spec["pattern"], spec["flags"]) if mode == "regex" else None

    def extract(completion: str) -> str | None:
        if mode == "last_number":
            return last_number(completion)
        if mode == "boxed":
            return last_boxed(completion)
        if mode == "after_marker":
            return after_marker(completion, spec["marker"])
        if mode == "regex":
            try:
                matches = list(pattern.finditer(completion, timeout=PATTERN_TIMEOUT_S))
            except TimeoutError:
                raise pattern_timed_out(pattern) from None
            if not matches:
                return None
            return matches[-1].group(1 if pattern.groups else 0)
        return completion

    def score(prompt: str, completion: str, row: dict[str, Any]) -> float:
        expected = str(row_value(row, field_name))
        predicted = extract(completion)
        if predicted is None:
            return 0.0
        return float(answers_equal(predicted, expected, case_sensitive=spec["case_sensitive"]))

    return PerCompletion(score)


EXACT_MATCH = RewardType(
    summary="1.0 when the answer extracted from the completion equals row[field]",
    options={
        "field": Option("string", "answer"),
        "extract": Option("string", "last_number", choices=EXTRACTIONS),
        "marker": Option("string", "####"),
        "pattern": Option("string", None),
        "flags": Option("string", ""),
        "case_sensitive": Option("boolean", False),
    },
    check=_check_exact_match,
    build=_build_exact_match,
    fields=lambda spec: {spec["field"]},
)


# --- math --------------------------------------------------------------------------------------


MAX_MATH_TIMEOUT_S = 60  # a check holds one of the process's few math-verify children this long


def _check_math(spec: dict[str, Any], param: str) -> None:
    if spec["timeout_s"] > MAX_MATH_TIMEOUT_S:
        raise ConfigError(
            f"{param}.timeout_s",
            f"must be <= {MAX_MATH_TIMEOUT_S} s, got {spec['timeout_s']}; "
            "math-verify answers in milliseconds unless an expression is pathological",
        )


def _build_math(spec: dict[str, Any], **_: Any) -> PerCompletion:
    if importlib.util.find_spec("math_verify") is None:
        raise ModuleNotFoundError("the math reward needs math-verify: pip install math-verify")
    field_name = spec["field"]

    def score(prompt: str, completion: str, row: dict[str, Any]) -> float:
        expected = str(row_value(row, field_name))
        try:
            return check_math(expected, completion, timeout_s=spec["timeout_s"])
        except GoldUnreadable:
            raise RewardError(
                f"math-verify cannot read the row's {field_name!r} value {expected[:80]!r}; "
                "write it as a number or LaTeX, e.g. \\frac{1}{2}"
            ) from None

    return PerCompletion(score)


MATH = RewardType(
    summary="1.0 when the completion's answer is mathematically equivalent to row[field] (math-verify)",
    options={"field": Option("string", "answer"), "timeout_s": Option("integer", 5, minimum=1)},
    check=_check_math,
    build=_build_math,
    fields=lambda spec: {spec["field"]},
)


# --- regex -------------------------------------------------------------------------------------


def covered_fraction(pattern: regex.Pattern[str], text: str, timeout_s: float | None = None) -> float:
    """The share of ``text``'s characters inside non-overlapping matches of ``pattern``."""
    if not text:
        return 0.0
    return sum(match.end() - match.start() for match in pattern.finditer(text, timeout=timeout_s)) / len(text)


def _build_regex(spec: dict[str, Any], **_: Any) -> PerCompletion:
    pattern = compile_pattern(spec["pattern"], spec["flags"])

    def score(prompt: str, completion: str, row: dict[str, Any]) -> float:
        try:
            if spec["score"] == "fraction":
                return covered_fraction(pattern, completion, PATTERN_TIMEOUT_S)
            match = pattern.fullmatch if spec["full_match"] else pattern.search
            return 1.0 if match(completion, timeout=PATTERN_TIMEOUT_S) else 0.0
        except TimeoutError:
            raise pattern_timed_out(pattern) from None

    return PerCompletion(score)


REGEX = RewardType(
    summary="1.0 when the completion matches pattern, or the share of it that matches (score: fraction)",
    options={
        "pattern": Option("string", example='"^<think>.*</think>"'),
        "flags": Option("string", ""),
        "score": Option("string", "match", choices=("match", "fraction")),
        "full_match": Option("boolean", False),
    },
    check=check_pattern,
    build=_build_regex,
)


# --- length ------------------------------------------------------------------------------------


def length_reward(length: int, *, target: int | None = None, max_length: int | None = None) -> float:
    """``1 - |length - target| / target`` floored at 0, or a penalty past ``max_length`` down to -1."""
    if target is not None:
        return max(0.0, 1.0 - abs(length - target) / target)
    assert max_length is not None
    return max(-1.0, -max(0, length - max_length) / max_length)


def _check_length(spec: dict[str, Any], param: str) -> None:
    if (spec["target"] is None) == (spec["max_length"] is None):
        raise ConfigError(
            f"{param}.target",
            "give exactly one of target (reward closeness to a length in "
            "characters) or max_length (penalise characters beyond it)",
        )


def _build_length(spec: dict[str, Any], **_: Any) -> PerCompletion:
    def score(prompt: str, completion: str, row: dict[str, Any]) -> float:
        return length_reward(len(completion), target=spec["target"], max_length=spec["max_length"])

    return PerCompletion(score)


LENGTH = RewardType(
    summary="closeness of the completion's length in characters to target, or a penalty beyond max_length",
    options={"target": Option("integer", None, minimum=1), "max_length": Option("integer", None, minimum=1)},
    check=_check_length,
    build=_build_length,
)
