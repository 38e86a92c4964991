"""``POST /v1/rewards/run``: try a reward spec on completions before a job burns GPU hours."""

from __future__ import annotations

from functools import partial

import anyio
from fastapi import APIRouter, Request

from api.deps import SettingsDep
from api.errors import responses
from jobs.reward_runs import run_rewards
from jobs.schemas import RewardRunIn, RewardRunOut

router = APIRouter(prefix="/v1/rewards", tags=["rewards"])


def reward_run_limiter(request: Request) -> anyio.CapacityLimiter:
    """Dry-runs get their own few threads (GRPO_REWARD_RUNS_AT_ONCE): a burst of them waits its
    turn instead of taking the threadpool every other sync route runs in."""
    state = request.app.state
    if getattr(state, "reward_run_limiter", None) is None:
        state.reward_run_limiter = anyio.CapacityLimiter(max(1, state.settings.reward_runs_at_once))
    return state.reward_run_limiter


@router.post("/run", response_model=RewardRunOut, responses=responses(413, 422))
async def run_reward_spec(body: RewardRunIn, settings: SettingsDep, request: Request) -> RewardRunOut:
    """Score each sample's completion with the reward functions, exactly as a training step
    would: the weighted total, each function's unweighted part, and the errors. The spec is
    checked like a job's (a 422 names `reward[i].field`). `reward_model` rewards are refused
    (the API process loads no models); completions are yours to give: the API does not
    generate them with the base model. At most GRPO_MAX_REWARD_RUN_SAMPLES samples."""
    return await anyio.to_thread.run_sync(partial(run_rewards, body, settings), limiter=reward_run_limiter(request))
