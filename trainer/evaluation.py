"""Evaluation on the eval set, and what it chooses: the best checkpoint, and a warning when the
training reward and the eval reward part ways.

Every checkpoint (and every ``eval_every`` steps) is evaluated on the eval set's first
``eval_max_rows`` rows:

- ``eval/reward``: the mean total reward of one greedy completion per row (argmax decoding, the
  same tokens HF ``generate(do_sample=False)`` gives), and ``eval/rewards/<name>`` per function;
- with ``eval_pass_k = k``: k completions sampled per row at the training temperature and top-p;
  one *passes* when its total (weighted) reward is at least ``eval_pass_threshold`` (default 1.0:
  a correct answer under a weight-1 ``exact_match``, whatever a smaller format bonus adds).
  ``eval/pass@1`` and ``eval/pass@k`` are the unbiased estimates (Chen et al. 2021) averaged over
  rows. Sampling draws from a generator seeded by ``seed + step``, never the training one, so an
  evaluation changes nothing in training and every checkpoint is scored on the same draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trainer.config import GRPOConfig

if TYPE_CHECKING:
    import torch

    from trainer.batch import ScoredGroups
    from trainer.loop import Rollouts

EVAL_PREFIX = "eval/"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` passed:
    ``1 - C(n-c, k) / C(n, k)``, the chance that k of the n drawn without replacement hold a pass.
    As the product ``prod_{i<k} (n-c-i) / (n-i)`` (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k holds a pass
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


class Evaluator:
    """Scores the policy on the first ``eval_max_rows`` of ``rows`` through ``rollouts`` (the
    training's), sampling from ``generator``: its own, reseeded per evaluation."""

    def __init__(
        self, rollouts: Rollouts, rows: Sequence[dict], config: GRPOConfig, generator: torch.Generator
    ):
        self.rollouts, self.rows, self.config, self.generator = rollouts, rows, config, generator
        self.indices = list(range(min(len(rows), config.eval_max_rows)))
        # sequences per generate call: what one training step generates
        self.sequences_per_call = max(1, config.prompts_per_step * config.group_size)

    def __call__(self, step: int) -> dict[str, float]:
        cfg, started = self.config, time.perf_counter()
        self.generator.manual_seed(cfg.seed + step)
        totals: list[float] = []
        parts: dict[str, list[float]] = {}
        lengths: list[int] = []
        for chunk in self._chunks(1):
            greedy = self._roll(chunk, group_size=1, temperature=0.0)
            totals += greedy.rewards.tolist()
            lengths += [c.shape[0] for c in greedy.completion_ids]
            for name, values in greedy.parts.items():
                parts.setdefault(name, []).extend(v for v in values if v is not None)
        metrics = {"eval/reward": sum(totals) / max(len(totals), 1)}
        for name, values in parts.items():
            metrics[f"eval/rewards/{name}"] = sum(values) / max(len(values), 1)
        metrics["eval/completion_length"] = sum(lengths) / max(len(lengths), 1)
        if cfg.eval_pass_k:
            metrics.update(self._pass_at_k())
        metrics["eval/rows"] = float(len(self.indices))
        metrics["time/eval"] = time.perf_counter() - started
        return metrics

    def _pass_at_k(self) -> dict[str, float]:
        cfg, k = self.config, self.config.eval_pass_k
        estimates: dict[int, list[float]] = {1: [], k: []}
        for chunk in self._chunks(k):
            sampled = self._roll(chunk, group_size=k, temperature=cfg.temperature)
            passed = (sampled.rewards >= cfg.eval_pass_threshold).view(len(chunk), k).sum(dim=1)  # [rows]
            for c in passed.tolist():
                for kk in estimates:
                    estimates[kk].append(pass_at_k(k, c, kk))
        return {f"eval/pass@{kk}": sum(values) / max(len(values), 1) for kk, values in estimates.items()}

    def _roll(self, chunk: list[int], *, group_size: int, temperature: float) -> ScoredGroups:
        return self.rollouts(
            self.rows,
            chunk,
            group_size=group_size,
            temperature=temperature,
            generator=self.generator,
            timings={},
        )

    def _chunks(self, per_row: int) -> list[list[int]]:
        rows = max(1, self.sequences_per_call // per_row)
        return [self.indices[i : i + rows] for i in range(0, len(self.indices), rows)]


def checkpoint_figures(metrics: dict[str, float]) -> dict[str, float]:
    """An evaluation's figures as a checkpoint carries them: ``eval/reward`` -> ``reward``."""
    return {
        name.removeprefix(EVAL_PREFIX): value
        for name, value in metrics.items()
        if name.startswith(EVAL_PREFIX)
    }


class BestCheckpoint:
    """The best evaluated checkpoint so far by one eval figure (higher is better); an earlier
    checkpoint keeps the title on a tie. ``metric`` None: nothing is chosen."""

    def __init__(self, metric: str | None):
        self.metric = metric
        self.step: int | None = None
        self.value: float | None = None

    def consider(self, step: int, metrics: dict[str, float]) -> bool:
        """Take checkpoint ``step``'s evaluation into account; True when it is the new best."""
        value = metrics.get(self.metric) if self.metric else None
        if value is None or not math.isfinite(value):
            return False
        if self.value is not None and value <= self.value:
            return False
        self.step, self.value = step, float(value)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "step": self.step, "value": self.value}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and state.get("metric") == self.metric:
            self.step, self.value = state.get("step"), state.get("value")


class DivergenceWatch:
    """Warns when the eval reward fell at each of the last ``window`` evaluations (strictly)
    while the mean training reward over the same span rose: the policy learns to please the
    reward on the training prompts in a way that does not carry over (reward hacking, or
    overfitting). Each evaluation is paired with the mean training reward of the steps since the
    one before. One warning per occurrence: it is re-armed once the pattern breaks."""

    def __init__(self, window: int = 3):
        if window < 2:
            raise ValueError("a trend needs a window of at least 2 evaluations")
        self.window = window
        self.history: list[tuple[int, float, float]] = []  # (step, eval reward, mean training reward)
        self.pending: list[float] = []  # training rewards since the last evaluation
        self.firing = False

    def add_training_reward(self, reward: float) -> None:
        if math.isfinite(reward):
            self.pending.append(reward)

    def observe(self, step: int, eval_reward: float) -> str | None:
        """Record an evaluation; the warning to give, if this one completes the pattern."""
        train_reward = sum(self.pending) / len(self.pending) if self.pending else math.nan
        self.pending = []
        self.history = [*self.history, (step, eval_reward, train_reward)][-self.window :]
        diverging = self._diverging()
        warn, self.firing = diverging and not self.firing, diverging
        if not warn:
            return None
        steps = ", ".join(str(s) for s, _, _ in self.history)
        evals = " -> ".join(f"{e:.3f}" for _, e, _ in self.history)
        first, last = self.history[0][2], self.history[-1][2]
        return (
            f"eval reward fell at each of the last {self.window} evaluations (steps {steps}: {evals}) "
            f"while the training reward rose ({first:.3f} -> {last:.3f}): reward hacking or overfitting. "
            'Read the recent samples; keep_best_by (e.g. "eval/reward") keeps the checkpoint '
            "that evaluated best"
        )

    def _diverging(self) -> bool:
        if len(self.history) < self.window:
            return False
        evals = [e for _, e, _ in self.history]
        trains = [t for _, _, t in self.history]
        if not all(math.isfinite(v) for v in evals + trains):
            return False
        falling = all(later < earlier for earlier, later in zip(evals, evals[1:], strict=False))
        return falling and trains[-1] > trains[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [list(h) for h in self.history],
            "pending": list(self.pending),
            "firing": self.firing,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.history = [(int(s), float(e), float(t)) for s, e, t in state.get("history", [])]
            self.pending = [float(r) for r in state.get("pending", [])]
            self.firing = bool(state.get("firing", False))
