"""``RewardSuite``: the reward functions of one run, built once and combined with their weights."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.config import OperatorPolicy
from trainer.rewards.base import RewardError, RewardFunction
from trainer.rewards.registry import REWARD_TYPES, validate_reward_specs
from trainer.rewards.stop import ScoringStopped, StopSignal, scoring_under

logger = logging.getLogger(__name__)
MAX_ERROR_MESSAGES = 5
MAX_MESSAGE_CHARS = 300
MAX_ABS_SCORE = 1e12  # a larger score is a bug; weighted and summed it could overflow to infinity


@dataclass
class RewardOutput:
    total: list[float]  # weighted sum per completion; an errored part contributes 0
    parts: dict[str, list[float | None]]  # per function name, the unweighted score, None where it errored
    errors: dict[str, int]  # per function name, how many completions errored
    error_messages: list[str]  # up to MAX_ERROR_MESSAGES distinct "name: message"


def check_operator_policy(specs: Sequence[dict[str, Any]], policy: OperatorPolicy) -> None:
    """ConfigError naming ``reward[i].option`` where validated ``specs`` ask for what ``policy``
    (the operator's) does not allow: a non-public URL, a network for code."""
    for index, spec in enumerate(specs):
        check = REWARD_TYPES[spec["type"]].check_policy
        if check is not None:
            check(spec, f"reward[{index}]", policy)


class RewardSuite:
    """Validates the specs, checks them against the operator's ``policy`` (default: allow
    nothing beyond the spec's own checks), builds each function (loading a reward model if one
    is named, onto ``device``: the trainer passes its own; the API's checks the CPU) and scores
    batches: ``suite(prompts, completions, rows) -> RewardOutput``.

    ``suite(..., stop=signal)`` lets another thread end the batch: ``signal.stop(reason)`` kills
    its sandboxes, cuts its HTTP calls, and the call raises ``ScoringStopped`` (see ``stop.py``);
    ``running`` then names the index of the reward function that was scoring.
    """

    def __init__(
        self, specs: list[dict[str, Any]], *, device: Any = "cpu", policy: OperatorPolicy | None = None
    ):
        policy = policy or OperatorPolicy()
        self.specs = validate_reward_specs(specs)
        check_operator_policy(self.specs, policy)
        self.names: list[str] = [spec["name"] for spec in self.specs]
        self.weights: list[float] = [spec["weight"] for spec in self.specs]
        self._functions: list[RewardFunction] = []
        self.running: int | None = None  # the index of the function scoring now
        try:
            for index, spec in enumerate(self.specs):
                build = REWARD_TYPES[spec["type"]].build
                self._functions.append(build(spec, device=device, param=f"reward[{index}]", policy=policy))
        except BaseException:
            self.close()
            raise

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        rows: list[dict[str, Any]],
        *,
        stop: StopSignal | None = None,
    ) -> RewardOutput:
        if not len(prompts) == len(completions) == len(rows):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(completions)} completions and {len(rows)} rows; "
                "pass one prompt and one row per completion"
            )
        total = [0.0] * len(completions)
        parts: dict[str, list[float | None]] = {}
        errors: dict[str, int] = {}
        messages: list[str] = []
        for index, (name, weight, function) in enumerate(
            zip(self.names, self.weights, self._functions, strict=True)
        ):
            self.running = index
            with scoring_under(stop):
                if stop is not None:
                    stop.check()
                scores = self._score(name, function, prompts, completions, rows)
                if stop is not None:
                    stop.check()  # a stopped function's scores are what its cut-off work left: not results
            parts[name] = []
            errors[name] = 0
            for index, score in enumerate(scores):
                if isinstance(score, float):
                    parts[name].append(score)
                    total[index] += weight * score
                    continue
                parts[name].append(None)
                errors[name] += 1
                message = f"{name}: {_describe(score)}"
                if message not in messages and len(messages) < MAX_ERROR_MESSAGES:
                    messages.append(message)
        self.running = None
        return RewardOutput(total=total, parts=parts, errors=errors, error_messages=messages)

    def _score(
        self,
        name: str,
        function: RewardFunction,
        prompts: list[str],
        completions: list[str],
        rows: list[dict[str, Any]],
    ) -> list[float | Exception]:
        """One entry per completion: a finite float or the exception that stands for it."""
        try:
            scores = function(prompts, completions, rows)
            if len(scores) != len(completions):
                raise RewardError(f"returned {len(scores)} scores for {len(completions)} completions")
        except ScoringStopped:
            raise
        except Exception as exc:  # a batch-level failure (a reward model, an endpoint) fails every completion
            logger.debug("reward %s failed for the whole batch", name, exc_info=True)
            return [exc] * len(completions)
        checked: list[float | Exception] = []
        for score in scores:
            if isinstance(score, Exception):
                checked.append(score)
            elif math.isfinite(score) and abs(score) <= MAX_ABS_SCORE:
                checked.append(float(score))
            elif math.isfinite(score):
                checked.append(
                    RewardError(f"gave the score {score:g}, beyond ±{MAX_ABS_SCORE:g}; scale it down")
                )
            else:
                checked.append(RewardError(f"gave a non-finite score ({score})"))
        return checked

    def close(self) -> None:
        """Frees what the functions hold (a reward model, an HTTP client)."""
        for function in self._functions:
            try:
                function.close()
            except Exception:
                logger.warning("closing a reward function failed", exc_info=True)
        self._functions = []

    def __enter__(self) -> RewardSuite:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _describe(exc: Exception) -> str:
    text = str(exc) if isinstance(exc, RewardError) else f"{type(exc).__name__}: {exc}"
    return text[:MAX_MESSAGE_CHARS]
