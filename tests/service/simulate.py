"""A stand-in for the worker that writes the job record through the worker's own queries, at
the pace a test chooses: for clients whose subject is how they show progress (the dashboard's
polling, the CLI's progress bar), not the training."""

from __future__ import annotations

import math

from jobs.db import transaction
from jobs.models import JobStatus
from jobs.queries import add_event, add_samples, append_metrics, claim_job, finish_job, record_step
from jobs.settings import Settings
from tests.service.factories import make_checkpoint


def metrics_at(step: int) -> dict[str, float]:
    """Plausible curves: the reward climbs, the KL grows a little, the loss wobbles."""
    reward = 1.2 * (1 - math.exp(-step / 12)) + 0.08 * math.sin(step * 1.7)
    return {
        "reward": reward,
        "reward_std": 0.45 * math.exp(-step / 30) + 0.05,
        "kl": 0.0004 * step,
        "loss": 0.02 * math.cos(step / 3) * math.exp(-step / 40),
        "grad_norm": 0.8 + 0.3 * math.sin(step / 2),
        "frac_reward_zero_std": min(0.9, 0.1 + step / 60),
        "completion_length": 48 - step / 2,
        "learning_rate": 1e-6,
        "entropy": 1.6 - step / 50,
    }


class SimulatedWorker:
    def __init__(self, settings: Settings, job_id: str, name: str = "sim@test/1"):
        self.settings, self.job_id, self.name = settings, job_id, name

    def claim(self) -> SimulatedWorker:
        with transaction(self.settings.database_url) as session:
            assert claim_job(session=session, job_id=self.job_id, worker=self.name) is not None
        return self

    def step(self, step: int) -> None:
        metrics = metrics_at(step)
        samples = [
            {
                "prompt": f"What is {step} + {i}?",
                "completion": f"<think>{step} plus {i}</think> {step + i}",
                "reward": metrics["reward"] + i / 10,
                "advantage": 0.7 - i,
                "truncated": False,
                "rewards": {"exact_match": 1.0 - i, "regex": 1.0},
            }
            for i in range(2)
        ]
        with transaction(self.settings.database_url) as session:
            assert record_step(session=session, job_id=self.job_id, worker=self.name, step=step)
            append_metrics(session=session, job_id=self.job_id, step=step, metrics=metrics)
            add_samples(session=session, job_id=self.job_id, step=step, samples=samples)

    def checkpoint(self, step: int) -> None:
        make_checkpoint(self.settings, self.job_id, step)
        with transaction(self.settings.database_url) as session:
            add_event(
                session=session,
                job_id=self.job_id,
                kind="checkpoint",
                message=f"checkpoint at step {step}",
                data={"step": step, "kind": "model", "bytes": 1296},
            )

    def finish(self, status: JobStatus = JobStatus.succeeded, reason: str | None = None) -> None:
        with transaction(self.settings.database_url) as session:
            assert finish_job(
                session=session, job_id=self.job_id, worker=self.name, status=status, reason=reason
            )

    def run(self, steps: int, *, checkpoint_every: int = 0) -> None:
        """A whole job, at once."""
        self.claim()
        for step in range(1, steps + 1):
            self.step(step)
            if checkpoint_every and (step % checkpoint_every == 0 or step == steps):
                self.checkpoint(step)
        self.finish()
