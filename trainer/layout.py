"""The names inside a run's output directory that the service reads too (its downloads leave the
resume state out; a merged model sits beside the checkpoints under the same name). Torch-free,
so the job record (``jobs.artifacts``) imports them instead of writing them again."""

from __future__ import annotations

import re

STATE_DIR = "trainer_state"  # inside a checkpoint: what only resuming needs (optimizer, RNG, step)
CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"
