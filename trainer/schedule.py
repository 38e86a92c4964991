"""The learning-rate schedule, counted in optimizer updates (``num_iterations`` a step, so
``max_steps * num_iterations`` a run): a linear warmup over the first ``warmup_steps``, then the
rate held (``constant``) or decayed to 0 at the last update along a cosine or a line."""

from __future__ import annotations

import math
from collections.abc import Callable

from trainer.config import GRPOConfig


def lr_lambda(config: GRPOConfig) -> Callable[[int], float]:
    """The factor on ``learning_rate`` at each optimizer update, for ``torch.optim.lr_scheduler.LambdaLR``."""
    total = config.max_steps * config.num_iterations

    def factor(update: int) -> float:
        if update < config.warmup_steps:
            return (update + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (update - config.warmup_steps) / max(1, total - config.warmup_steps)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)  # linear

    return factor
