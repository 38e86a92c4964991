"""``python -m worker [celery worker options]``: a training worker on the queues of every job size
its devices fit (``GRPO_WORKER_DEVICES``, ``jobs.broker.train_queues``);
``python -m worker --inference``: an inference worker (chat completions) on the inference queue."""

from __future__ import annotations

import sys

from jobs.broker import train_queues
from jobs.settings import get_settings
from worker.app import app
from worker.devices import DeviceError, worker_devices
from worker.sweeper import SweeperStep


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    extra = list(sys.argv[1:] if argv is None else argv)
    if "--inference" in extra:
        extra.remove("--inference")
        # One request at a time in the main process (solo pool), which keeps its loaded checkpoints
        # warm between requests; no sweeper: its idle slot would count as lost training messages
        # and re-send every queued job (worker/sweeper.py), and the training workers run one anyway.
        app.steps["worker"].discard(SweeperStep)
        queues, pool = [settings.inference_queue], ["--pool", "solo"]
    else:
        try:
            devices = worker_devices(settings.worker_devices)
        except DeviceError as exc:
            sys.exit(str(exc))
        queues, pool = train_queues(settings, len(devices)), ["--pool", "prefork"]
    # gossip and mingle are cluster chatter this service does not use (the database is the shared
    # state); mingle would also hold every start for a round of replies.
    args = [
        "worker",
        "--queues",
        ",".join(queues),
        "--loglevel",
        "INFO",
        *pool,
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]
    app.worker_main(args)


if __name__ == "__main__":
    main()
