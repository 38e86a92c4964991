"""The embedded setup: the API, one worker and one inference worker, as child processes of one
command.

The children run the very commands of a deployment (``uvicorn api.main:app``,
``python -m worker`` and ``python -m worker --inference``); only the settings differ: a SQLite
file, the filesystem broker, chat answers as files, and the artifacts, all under one data
directory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from api.main import KEEP_ALIVE_S
from jobs.migrate import upgrade
from jobs.settings import Settings

log = logging.getLogger(__name__)

OVERRIDDEN = (
    "GRPO_DATABASE_URL",
    "GRPO_BROKER_URL",
    "GRPO_BROKER_DIR",
    "GRPO_ARTIFACT_DIR",
    "GRPO_RESULT_BACKEND",
)


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDDEN}
    env["GRPO_DATA_DIR"] = str(data_dir.resolve())
    return env


def embedded_settings(data_dir: Path) -> Settings:
    """The settings the embedded children run with (e.g. to create an API key in their database)."""
    return Settings(
        data_dir=data_dir.resolve(),
        database_url="",
        broker_url="filesystem://",
        broker_dir=None,
        artifact_dir=None,
        result_backend="",
    )


def run_embedded(data_dir: Path, *, host: str, port: int) -> int:
    """Migrate, start the API, a worker and an inference worker, and stop them all when one ends
    or on SIGINT/SIGTERM."""
    env = embedded_env(data_dir)
    settings = embedded_settings(data_dir)
    upgrade(settings.database_url)
    log.info("embedded service: data in %s, API on http://%s:%d", settings.data_dir, host, port)
    if settings.auth == "required":
        log.info("API keys for it: GRPO_DATA_DIR=%s grpo keys create NAME", settings.data_dir)

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    children = {
        "api": subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:app",
                "--host",
                host,
                "--port",
                str(port),
                "--timeout-keep-alive",
                str(KEEP_ALIVE_S),
            ],
            env=env,
        ),
        "worker": subprocess.Popen([sys.executable, "-m", "worker"], env=env),
        "inference worker": subprocess.Popen([sys.executable, "-m", "worker", "--inference"], env=env),
    }
    while not stopping.is_set() and all(child.poll() is None for child in children.values()):
        stopping.wait(0.5)
    for name, child in children.items():
        if child.poll() is None:
            child.terminate()
        elif not stopping.is_set():
            log.error("the %s process exited with %s; stopping the others", name, child.returncode)
    for child in children.values():
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0 if stopping.is_set() else 1
