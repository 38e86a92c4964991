"""The reward dry-run: score given completions with a job's reward spec, before a GPU is spent.

It runs the trainer's own ``RewardSuite`` on the whole batch at once, as a training step does
(an ``http`` reward gets the batch in one POST). It never loads a model: ``reward_model`` rewards
are refused, since they would pull torch into the API process; and generating completions with
the base model is a job's work, not the API's.

A dry-run is bounded: GRPO_MAX_REWARD_RUN_SAMPLES samples, GRPO_MAX_REWARD_RUN_REWARDS reward
functions, and a ``StopSignal`` the API sets when the client hangs up or the request's time
(GRPO_REWARD_RUN_TIMEOUT_S) is up: the suite then kills its sandboxes, cuts its HTTP calls and
stops between completions (``trainer/rewards/stop.py``).
"""

from __future__ import annotations

from typing import Any

from jobs.errors import InvalidRequest, LimitExceeded, RewardRunTimedOut
from jobs.schemas import RewardRunIn, RewardRunOut, RewardRunSample, RewardScore
from jobs.settings import Settings
from jobs.submission import as_invalid_request, check_rewards, operator_policy
from trainer.data import messages_text
from trainer.errors import TrainingError
from trainer.rewards import RewardSuite
from trainer.rewards.stop import ScoringStopped, StopSignal

# What the API uses, re-exported here: api/ imports jobs, not trainer.
__all__ = ["TIMED_OUT", "ScoringStopped", "StopSignal", "check_reward_run", "run_rewards"]
TIMED_OUT = "the request's time is up"  # a StopSignal's reason, set by the API

NOT_IN_DRY_RUNS = {
    "reward_model": "a reward_model reward loads a model, which the API process does not do; "
    "try the other rewards here, and the reward model in a short job (max_steps: 1)",
}


def check_reward_run(request: RewardRunIn, settings: Settings) -> list[dict[str, Any]]:
    """The normalised specs, or ``InvalidRequest`` naming ``reward[i].field`` or ``samples``."""
    if len(request.samples) > settings.max_reward_run_samples:
        raise LimitExceeded(
            f"{len(request.samples)} samples; this server scores at most "
            f"{settings.max_reward_run_samples} per request (GRPO_MAX_REWARD_RUN_SAMPLES)",
            param="samples",
        )
    if len(request.reward) > settings.max_reward_run_rewards:
        raise LimitExceeded(
            f"{len(request.reward)} reward functions; this server tries at most "
            f"{settings.max_reward_run_rewards} in one dry-run (GRPO_MAX_REWARD_RUN_REWARDS): "
            "split them over several requests",
            param="reward",
        )
    specs = check_rewards(request.reward, settings)
    for index, spec in enumerate(specs):
        if spec["type"] in NOT_IN_DRY_RUNS:
            raise InvalidRequest(NOT_IN_DRY_RUNS[spec["type"]], param=f"reward[{index}].type")
    return specs


def prompt_text(sample: RewardRunSample) -> str:
    """The prompt a reward sees. Chat messages are joined by their contents: the API has no
    tokenizer to apply the base model's chat template (rule-based rewards rarely read it)."""
    prompt = sample.prompt if sample.prompt is not None else sample.row.get("prompt", "")
    if isinstance(prompt, list):
        return messages_text(prompt)
    return prompt if isinstance(prompt, str) else ""


def run_rewards(request: RewardRunIn, settings: Settings, stop: StopSignal | None = None) -> RewardRunOut:
    """Blocking (sandboxes, HTTP rewards): call it from a worker thread, and ``stop`` it from
    another: stopped with TIMED_OUT, it raises ``RewardRunTimedOut``; for any other reason,
    ``ScoringStopped`` (nobody is waiting for an answer)."""
    specs = check_reward_run(request, settings)
    rows = [{"prompt": prompt_text(s), **s.row} for s in request.samples]
    try:
        with as_invalid_request(), RewardSuite(specs, policy=operator_policy(settings)) as suite:
            try:
                out = suite(
                    [prompt_text(s) for s in request.samples],
                    [s.completion for s in request.samples],
                    rows,
                    stop=stop,
                )
            except ScoringStopped as exc:
                if exc.reason != TIMED_OUT:
                    raise
                raise timed_out(specs, suite.running, settings) from None
    except TrainingError as exc:  # a reward that cannot even be built, e.g. no sandbox on this host
        raise InvalidRequest(str(exc), param="reward") from None
    scores = [
        RewardScore(
            total=total,
            parts={name: values[i] for name, values in out.parts.items()},
            errors=[name for name, values in out.parts.items() if values[i] is None],
        )
        for i, total in enumerate(out.total)
    ]
    return RewardRunOut(reward=specs, data=scores, errors=out.errors, error_messages=out.error_messages)


def timed_out(specs: list[dict[str, Any]], running: int | None, settings: Settings) -> RewardRunTimedOut:
    index = running or 0
    return RewardRunTimedOut(
        f"the dry-run ran past this server's limit of {settings.reward_run_timeout_s:g} s "
        f"(GRPO_REWARD_RUN_TIMEOUT_S) while scoring reward[{index}] ({specs[index]['name']}), "
        "and was stopped; score fewer samples at once, or lower that reward's timeout_s (or retries)",
        param=f"reward[{index}]",
    )
