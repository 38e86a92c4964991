"""The pieces every reward type is made of: its options, how it is built, how it scores.

A reward function takes the batch ``(prompts, completions, rows)`` and returns one entry per
completion: a float, or the exception that completion raised. Raising from the call itself is a
batch-level failure, which the suite counts against every completion.
"""

from __future__ import annotations

import re
import sys
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

# What a pattern may cost to compile. The engine compiles a repeat's minimum count as that many
# copies of what it repeats (250 B to 1.2 KB each), in the process that validates the spec: the
# API's. "a{1000000000}" asked it for ~21 GB, "(a{1000}){1000}" takes 260 MB and 1 s. So each count
# of a {m}, {m,} or {m,n} is at most MAX_REPEAT, and the elements a pattern expands to (each node
# of its parse, times the minimum counts of the repeats around it) at most MAX_PATTERN_ELEMENTS:
# at these limits a pattern compiles in at most ~35 ms and ~12 MB (measured under a 1.5 GB
# address-space limit; README, the rewards table).
MAX_PATTERN_LENGTH = 2000  # characters
MAX_REPEAT = 1000
MAX_PATTERN_ELEMENTS = 10_000
_SHOWN_ELEMENTS = 10**9  # an expansion past this is reported as "over", not counted out
_MAX_PARSE_NODES = 20 * MAX_PATTERN_LENGTH  # more nodes than a parse of that length has: not a tree


def regex_flags(flags: str) -> int:
    """The ``regex`` flags a spec's ``flags`` letters (already validated) stand for."""
    value = 0
    for letter in flags:
        value |= REGEX_FLAGS[letter]
    return value


def compile_pattern(pattern: str, flags: str) -> regex.Pattern[str]:
    """Compile a spec's ``pattern`` with its ``flags`` letters (already validated).

    Outside the ``regex`` module's cache: it keeps 500 compiled patterns, so distinct patterns
    sent for validation would stay in the API process. With the cache off the module still
    remembers, for every pattern string, whether it is locale-sensitive, in a table only its
    cache's pruning trims (70 MB for 100,000 patterns of 500 characters): forgotten here too."""
    try:
        return regex.compile(pattern, regex_flags(flags), cache_pattern=False)
    finally:
        remembered = getattr(sys.modules[regex.compile.__module__], "_locale_sensitive", None)
        if isinstance(remembered, dict):
            remembered.pop((type(pattern), pattern), None)


class _ParserChanged(Exception):
    """The ``regex`` package's internal parser is not the one ``_parse`` knows."""


def _parse(pattern: str, flags: int) -> Any:
    """The engine's own parse of ``pattern``, the first step of ``regex.compile`` (which does the
    same), so the counts and nesting measured are the ones it compiles: verbose mode's "a{1 000}"
    included. regex.error if it does not parse. The parser is internal to the package:
    ``_ParserChanged`` if it is not the one this was written for."""
    try:
        from regex import _regex_core as core

        global_flags = flags
        while True:
            source = core.Source(pattern)
            info = core.Info(global_flags, source.char_type, {})
            info.guess_encoding = core.UNICODE
            source.ignore_space = bool(info.flags & regex.VERBOSE)
            source.use_unicode_space(bool(info.flags & regex.VERSION1))
            try:
                return core._parse_pattern(source, info)
            except core._UnscopedFlagSet:  # a global flag, e.g. "(?i)", past the start: parse again
                global_flags = info.global_flags
    except (ImportError, AttributeError, TypeError) as exc:
        raise _ParserChanged from exc


def _repeats_parsed(pattern: str, flags: int) -> tuple[list[int], int, bool]:
    """The repeat counts in ``pattern``, the elements it expands to, and whether it calls a group
    (``(?R)``, ``(?1)``, ``(?&name)``), from the engine's parse."""
    parsed = _parse(pattern, flags)
    counts: list[int] = []
    elements, visited, calls = 0, 0, False
    try:
        from regex import _regex_core as core

        repeat, node_kind = core.GreedyRepeat, core.RegexBase  # lazy and possessive repeats subclass it
        stack: list[tuple[Any, int]] = [(parsed, 1)]
        while stack:  # iterative: the parse of a deeply nested pattern is deep
            node, factor = stack.pop()
            visited += 1
            if visited > _MAX_PARSE_NODES:
                raise _ParserChanged("the parse is larger than any of a pattern this long")
            elements = min(elements + factor, _SHOWN_ELEMENTS)
            calls = calls or isinstance(node, core.CallGroup)
            if isinstance(node, repeat):
                counts += [count for count in (node.min_count, node.max_count) if count is not None]
                factor = min(factor * max(node.min_count, 1), _SHOWN_ELEMENTS)
            for value in vars(node).values():  # the node's parts, whatever its kind names them
                children = value if isinstance(value, list | tuple) else (value,)
                stack.extend((child, factor) for child in children if isinstance(child, node_kind))
    except (ImportError, AttributeError, TypeError) as exc:
        raise _ParserChanged from exc
    return counts, elements, calls


_COUNT_IN_TEXT = re.compile(r"\{([0-9]*),?([0-9]*)\}")


_CALL_IN_TEXT = re.compile(r"\(\?(?:R|[-+]?[0-9]|&|P>)")  # (?R), (?1), (?-1), (?&name), (?P>name)


def _repeats_in_text(pattern: str) -> tuple[list[int], int, bool]:
    """A bound on what ``_repeats_parsed`` measures, read off the text: every "{m,n}" taken for a
    repeat (in a class or a comment too), all of them nested, around every node (a parse has at
    most two nodes a character, and one more); spaces dropped first (verbose mode may write
    "a{1 000}"). Used where the engine's parser changed."""
    counts: list[int] = []
    elements = 2 * len(pattern) + 1
    for match in _COUNT_IN_TEXT.finditer("".join(pattern.split())):
        counts += [int(digits) for digits in match.groups() if digits]
        elements = min(elements * max(int(match.group(1) or 0), 1), _SHOWN_ELEMENTS)
    return counts, elements, bool(_CALL_IN_TEXT.search(pattern))


def pattern_cost_problem(pattern: str, flags: int) -> str | None:
    """Why compiling ``pattern`` would cost the process too much, or None (regex.error if it does
    not parse; RecursionError if it nests too deeply to)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is {len(pattern)} characters long; at most {MAX_PATTERN_LENGTH}"
    try:
        counts, elements, calls = _repeats_parsed(pattern, flags)
    except _ParserChanged:
        counts, elements, calls = _repeats_in_text(pattern)
    if calls:
        return (
            "calls a group ((?R), (?1), (?&name)): a pattern that recurses can hold the engine's memory "
            "for seconds (~0.6 GB for (?R)?a); write it without group calls"
        )
    too_many = max(counts, default=0)
    if too_many > MAX_REPEAT:
        return (
            f"repeat count {too_many} exceeds {MAX_REPEAT}; each count of a {{m}}, {{m,}} or {{m,n}} "
            f"is at most {MAX_REPEAT} (use * or + for an open-ended repeat)"
        )
    if elements > MAX_PATTERN_ELEMENTS:
        shown = f"over {_SHOWN_ELEMENTS:,}" if elements >= _SHOWN_ELEMENTS else f"{elements:,}"
        return (
            f"is too large to compile: its repeats expand it to {shown} elements, at most "
            f"{MAX_PATTERN_ELEMENTS:,} (a repeat's minimum count multiplies what it repeats: "
            "(a{100}){100} is 10,302); use smaller counts, or * and +"
        )
    return None


def pattern_timed_out(pattern: regex.Pattern[str]) -> RewardError:
    """The error a completion gets when ``pattern`` ran past PATTERN_TIMEOUT_S on it."""
    shown = pattern.pattern if len(pattern.pattern) <= 60 else pattern.pattern[:57] + "..."
    return RewardError(
        f"the pattern {shown!r} timed out after {PATTERN_TIMEOUT_S:g}s on this completion; "
        "nested repetition such as (a+)+ or (a|a)+ backtracks exponentially, simplify it"
    )


def check_pattern(spec: dict[str, Any], param: str) -> None:
    """ConfigError unless ``spec["flags"]`` are known letters and ``spec["pattern"]`` compiles,
    within what compiling may cost (``pattern_cost_problem``)."""
    unknown = sorted(set(spec["flags"]) - set(REGEX_FLAGS))
    if unknown:
        raise ConfigError(
            f"{param}.flags",
            f"unknown regex flag {unknown[0]!r}; use letters from "
            f"{''.join(REGEX_FLAGS)} (a: ASCII, i: ignore case, m: multiline, "
            "s: dot matches newline, x: verbose)",
        )
    try:
        problem = pattern_cost_problem(spec["pattern"], regex_flags(spec["flags"]))
        if problem is not None:
            raise ConfigError(f"{param}.pattern", problem)
        compile_pattern(spec["pattern"], spec["flags"])
    except regex.error as exc:
        raise ConfigError(
            f"{param}.pattern",
            f"is not a valid regular expression ({exc}); fix it or escape "
            "special characters with a backslash",
        ) from None
    except RecursionError:  # Python's recursion limit, in the engine's parser or compiler
        raise ConfigError(
            f"{param}.pattern", "nests its groups too deeply to compile; use fewer levels of parentheses"
        ) from None
    except (MemoryError, OverflowError) as exc:  # what the limits above should leave to no pattern
        raise ConfigError(
            f"{param}.pattern", f"is too large to compile ({type(exc).__name__}); simplify it"
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
