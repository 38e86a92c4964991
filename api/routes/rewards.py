"""``POST /v1/rewards/run``: try a reward spec on completions before a job burns GPU hours."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import anyio
from fastapi import APIRouter, Request, Response

from api.deps import CurrentOwner, SettingsDep
from api.errors import responses
from jobs.errors import ServiceError, TooManyRewardRuns
from jobs.reward_runs import TIMED_OUT, ScoringStopped, StopSignal, run_rewards
from jobs.schemas import RewardRunIn, RewardRunOut
from jobs.settings import Settings

router = APIRouter(prefix="/v1/rewards", tags=["rewards"])
CLIENT_GONE = "the client disconnected"
WATCH_INTERVAL_S = 0.2  # how often a running dry-run looks for a hung-up client and its deadline
RETRY_AFTER_S = 5.0  # a 429's hint: dry-runs mostly end within seconds, and none outlives its timeout
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client hung up first": in logs only, nobody reads it


@dataclass
class _Line:
    """One owner's dry-runs in this process: the slots they may score in, and how many score or wait."""

    scoring: anyio.Semaphore
    admitted: int = 0


@dataclass
class RewardRunSlots:
    """Who scores now, in this API process. At most ``at_once`` dry-runs score (each in a thread of
    its own ``threads``), at most ``per_owner`` of them one owner's. An owner's further requests
    wait in the owner's own line first, so the shared line holds at most ``per_owner`` requests of
    any owner, and a free slot goes to whichever owner has waited longest (anyio's semaphores
    serve waiters first come, first served): many requests from one owner delay only that owner.
    Past ``per_owner + queue_per_owner`` requests, an owner gets a 429."""

    at_once: int
    per_owner: int
    queue_per_owner: int
    shared: anyio.Semaphore = field(init=False)
    threads: anyio.CapacityLimiter = field(init=False)
    lines: dict[str, _Line] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shared = anyio.Semaphore(self.at_once)
        self.threads = anyio.CapacityLimiter(self.at_once)

    @classmethod
    def of(cls, settings: Settings) -> RewardRunSlots:
        return cls(
            max(1, settings.reward_runs_at_once),
            settings.reward_runs_per_key,
            settings.reward_run_queue_per_key,
        )

    def admit(self, owner: str) -> _Line:
        """``owner``'s line, counting one more request in it (``leave`` when it ends), or
        TooManyRewardRuns."""
        line = self.lines.get(owner)
        if line is None:
            line = self.lines[owner] = _Line(anyio.Semaphore(self.per_owner))
        if line.admitted >= self.per_owner + self.queue_per_owner:
            raise TooManyRewardRuns(line.admitted, RETRY_AFTER_S)
        line.admitted += 1
        return line

    def leave(self, owner: str, line: _Line) -> None:
        line.admitted -= 1
        if not line.admitted:
            del self.lines[owner]


def reward_run_slots(request: Request) -> RewardRunSlots:
    state = request.app.state
    if getattr(state, "reward_run_slots", None) is None:
        state.reward_run_slots = RewardRunSlots.of(state.settings)
    return state.reward_run_slots


@dataclass
class _Watch:
    deadline: float | None = None  # anyio's clock; set once the run has a slot


async def _stop_when_needed(
    request: Request, stop: StopSignal, watch: _Watch, scope: anyio.CancelScope
) -> None:
    """Stop the run when its client hangs up (and leave the line if it had no slot yet), or at its
    deadline."""
    while not stop.stopped:
        if await request.is_disconnected():
            stop.stop(CLIENT_GONE)
            scope.cancel()
            return
        if watch.deadline is not None and anyio.current_time() >= watch.deadline:
            stop.stop(TIMED_OUT)
            return
        await anyio.sleep(WATCH_INTERVAL_S)


@router.post("/run", response_model=RewardRunOut, responses=responses(413, 422, 429))
async def run_reward_spec(
    body: RewardRunIn, settings: SettingsDep, owner: CurrentOwner, request: Request
) -> RewardRunOut | Response:
    """Score each sample's completion with the reward functions, exactly as a training step
    would: the weighted total, each function's unweighted part, and the errors. The spec is
    checked like a job's (a 422 names `reward[i].field`). `reward_model` rewards are refused
    (the API process loads no models); completions are yours to give: the API does not
    generate them with the base model. At most GRPO_MAX_REWARD_RUN_SAMPLES samples and
    GRPO_MAX_REWARD_RUN_REWARDS reward functions (a 422 naming `samples` or `reward`).

    Dry-runs share a few slots per API process (GRPO_REWARD_RUNS_AT_ONCE), at most
    GRPO_REWARD_RUNS_PER_KEY of them yours; your further requests wait for your own to end (up
    to GRPO_REWARD_RUN_QUEUE_PER_KEY of them; past that, a 429 `too_many_reward_runs` with
    Retry-After), never behind another owner's. A dry-run that scores longer than
    GRPO_REWARD_RUN_TIMEOUT_S is stopped (its sandboxes killed, its HTTP calls cut) and answered
    with a 422 `reward_run_timed_out` naming the reward that was scoring (`reward[i]`): no
    partial scores. Hanging up stops the dry-run too."""
    slots = reward_run_slots(request)
    line = slots.admit(owner)
    stop, watch = StopSignal(), _Watch()
    outcome: RewardRunOut | ServiceError | None = None  # None: the client hung up
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_stop_when_needed, request, stop, watch, group.cancel_scope)
            async with line.scoring, slots.shared:  # the owner's own line first, then the shared one
                watch.deadline = anyio.current_time() + settings.reward_run_timeout_s
                try:
                    outcome = await anyio.to_thread.run_sync(
                        partial(run_rewards, body, settings, stop), limiter=slots.threads
                    )
                except ServiceError as exc:
                    outcome = exc
                except ScoringStopped:
                    pass
            group.cancel_scope.cancel()
    finally:
        slots.leave(owner, line)
    if isinstance(outcome, ServiceError):
        raise outcome
    return outcome if outcome is not None else Response(status_code=CLIENT_CLOSED_REQUEST)
