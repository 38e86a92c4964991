"""The worker's Celery app: ``python -m worker`` or ``celery -A worker.app worker -Q gpu``.

Configured from ``GRPO_*`` settings (see ``worker.broker``); the sweeper runs in the worker's
main process beside the pool.
"""

from __future__ import annotations

import os

from jobs.settings import get_settings
from worker.broker import make_celery
from worker.sweeper import SweeperStep

# Progress bars are for terminals; in a worker's log each is a dozen WARNING lines. (Set before
# the tasks module, and with it transformers, is imported.)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = make_celery(get_settings())
app.steps["worker"].add(SweeperStep)
