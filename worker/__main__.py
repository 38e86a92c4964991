"""``python -m worker [celery worker options]``: a GPU worker on the configured queue;
``python -m worker --inference``: an inference worker (chat completions) on the inference queue."""

from __future__ import annotations

import sys

from jobs.settings import get_settings
from worker.app import app
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
        queue, pool = settings.inference_queue, ["--pool", "solo"]
    else:
        queue, pool = settings.queue, ["--pool", "prefork"]
    # gossip and mingle are cluster chatter this service does not use (the database is the shared
    # state); mingle would also hold every start for a round of replies.
    args = [
        "worker",
        "--queues",
        queue,
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
