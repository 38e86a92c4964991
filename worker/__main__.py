"""``python -m worker [celery worker options]``: a GPU worker on the configured queue."""

from __future__ import annotations

import sys

from jobs.settings import get_settings
from worker.app import app


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    # gossip and mingle are cluster chatter this service does not use (the database is the shared
    # state); mingle would also hold every start for a round of replies.
    args = ["worker", "--queues", settings.queue, "--loglevel", "INFO", "--pool", "prefork",
            "--without-gossip", "--without-mingle", *(sys.argv[1:] if argv is None else argv)]
    app.worker_main(args)


if __name__ == "__main__":
    main()
