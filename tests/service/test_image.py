"""The Docker image, checked without a Docker engine: the files the Dockerfile copies are
installed into a fresh environment the way its ``pip install .`` installs them, and each compose
service's command is started from there, on PostgreSQL and Redis as compose runs them.

The fresh environment sees the test environment's third-party packages (the image's
``pip install`` of the dependencies is not what can go wrong here) but none of the project's own
code: only what was copied into the image and installed from it. A module an image command
imports and the Dockerfile leaves out fails here as it fails in the container.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import inspect

from jobs.db import get_engine
from jobs.settings import Settings
from tests.service.conftest import REDIS_URL
from tests.service.factories import ROOT, ChildProcess, bearer, forget_broker_keys, free_port, wait_for

pytestmark = pytest.mark.slow
IMAGE_WORKDIR = "/app"


def dockerfile_copies() -> list[tuple[str, str]]:
    """(source, destination under the workdir) of every COPY in the Dockerfile."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert f"WORKDIR {IMAGE_WORKDIR}" in lines
    copies = []
    for line in lines:
        if line.startswith("COPY "):
            *sources, destination = shlex.split(line)[1:]
            copies += [
                (source, destination if destination not in ("./", ".") else source) for source in sources
            ]
    return copies


def compose_commands() -> dict[str, list[str]]:
    """The command of each compose service built from the Dockerfile, variables at their defaults."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {
        name: [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", part) for part in service["command"]]
        for name, service in services.items()
        if service.get("build") == "."
    }


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the image's install; its workdir is ``<root>/app``."""
    root = tmp_path_factory.mktemp("image")
    app = root / "app"
    app.mkdir()
    for source, destination in dockerfile_copies():
        target = app / destination
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / source, target)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The test environment's packages, as a plain path: its .pth files (the editable install of
    # this repository among them) are not processed from there.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            ".",
        ],
        cwd=app,
        check=True,
        env=clean_env(),
    )
    return root


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPO_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


class ImageProcess(ChildProcess):
    def __init__(self, image: Path, command: list[str], env: dict[str, str], name: str):
        self.log_path = image / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                resolve(image, command),
                cwd=image / "app",
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        return True


def resolve(image: Path, command: list[str]) -> list[str]:
    """The image's PATH: its own ``grpo`` and ``python`` first."""
    executable = image / "venv" / "bin" / command[0]
    return [str(executable) if executable.exists() else command[0], *command[1:]]


def test_the_dockerfile_copies_every_package_the_project_installs() -> None:
    copied = {source for source, _ in dockerfile_copies()}
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in found["include"]}
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="Debian's docker-compose (.ci/run installs it)"
)
def test_the_compose_file_parses() -> None:
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_compose_command_starts_from_the_installed_image(image: Path, make_database) -> None:
    commands = compose_commands()
    assert set(commands) == {"migrate", "api", "worker", "worker-multi-gpu", "inference"}, commands
    assert commands["worker-multi-gpu"] == commands["worker"]  # the same worker, declaring more devices
    tag = uuid.uuid4().hex[:8]
    database_url = make_database(migrate=False)
    env = clean_env(
        GRPO_DATABASE_URL=database_url,
        GRPO_BROKER_URL=REDIS_URL,
        GRPO_DATA_DIR=str(image / "data"),
        GRPO_BROKER_KEY_PREFIX=f"grpo-test-{tag}:",
        GRPO_QUEUE=f"gpu-{tag}",
        GRPO_INFERENCE_QUEUE=f"inference-{tag}",
    )

    migrate = subprocess.run(
        resolve(image, commands["migrate"]),
        cwd=image / "app",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    assert "jobs" in inspect(get_engine(database_url)).get_table_names()

    created = subprocess.run(
        resolve(image, ["grpo", "keys", "create", "ops"]),
        cwd=image / "app",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr[-3000:]
    secret = created.stdout.strip().splitlines()[-1]

    port = free_port()
    api_command = [part.replace("0.0.0.0", "127.0.0.1") for part in commands["api"]]
    api_command[api_command.index("--port") + 1] = str(port)
    api = ImageProcess(image, api_command, env, "api")
    worker = ImageProcess(image, commands["worker"], env, "worker")
    inference = ImageProcess(image, commands["inference"], env, "inference")
    try:

        def ready() -> bool:
            api.running()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=120, what="the image's API to be ready")
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers=bearer(secret), timeout=10)
        assert answer.status_code == 200, answer.text
        wait_for(
            lambda: worker.running() and " ready." in worker.log(),
            timeout=180,
            what="the image's worker to be ready",
        )
        wait_for(
            lambda: inference.running() and " ready." in inference.log(),
            timeout=180,
            what="the image's inference worker to be ready",
        )
        assert f"inference-{tag}" in inference.log() and "grpo.chat_completion" in inference.log()
    finally:
        api.stop()
        worker.stop()
        inference.stop()
        forget_broker_keys(Settings(broker_url=REDIS_URL, broker_key_prefix=f"grpo-test-{tag}:"))
