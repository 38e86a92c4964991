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


def concurrency_option(arg: str) -> str | None:
    """The option ``arg`` gives when it is Celery's ``--concurrency`` (``-c``) or ``--autoscale``,
    in any of its forms (``--concurrency=2``, ``-c2``)."""
    if arg.startswith("-c"):
        return "-c"
    name = arg.split("=")[0]
    return name if name in ("--concurrency", "--autoscale") else None


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
        # On GPUs a job has its devices to itself: jobs side by side would share them (every claim
        # leases from the first). A CPU worker may run several small jobs at once.
        refused = next(filter(None, map(concurrency_option, extra)), None)
        if refused and any(device.startswith("cuda") for device in devices):
            sys.exit(
                f"python -m worker: {refused} is not for a GPU training worker, which runs one job at "
                "a time on its devices (GRPO_WORKER_DEVICES); run more workers for more jobs"
            )
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
