"""The worker's Celery app: ``python -m worker``, which consumes the queues of the job sizes its
devices fit (or ``celery -A worker.app worker -Q gpu,gpu.gpus-2`` for a worker with two devices).

Configured from ``GRPO_*`` settings (see ``jobs.broker``); the sweeper runs in the worker's
main process beside the pool.
"""

from __future__ import annotations

import os

from celery.signals import worker_init

from jobs.broker import make_celery
from jobs.settings import get_settings
from worker.sweeper import SweeperStep

# Progress bars are for terminals; in a worker's log each is a dozen WARNING lines. (Set before
# the tasks module, and with it transformers, is imported.)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = make_celery(get_settings())
app.steps["worker"].add(SweeperStep)


@worker_init.connect
def preload_model_code(**_: object) -> None:
    """Import what a job's first ``from_pretrained`` would (a thousand modules, seconds of CPU)
    once, in the main process: every job runs in a freshly forked pool process, which inherits
    them instead of importing them again."""
    import peft  # noqa: F401  (LoRA)
    import transformers.generation.utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (the common architectures)
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
