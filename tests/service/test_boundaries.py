"""The package table of DESIGN.md, enforced for the service packages (the trainer's own rule is
tests/trainer/test_train.py::test_trainer_imports_no_web_database_or_queue_module): ``api`` never
imports ``worker``, ``trainer`` or torch; ``jobs`` never fastapi, ``api`` or ``worker``; ``worker``
never ``api``. Each rule is checked twice: on the source (every import statement of every module,
those inside functions too) and on a process that imports every module of the package.

Celery in ``jobs``: DESIGN gives the job record enqueueing (broker URL, task name, sender) and lets
it import "the broker client", which for a Celery queue is Celery. So it may, but only in the two
modules that talk to the broker; the rest of the record loads without it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.factories import ROOT

FORBIDDEN = {
    "api": {"worker", "trainer", "torch", "transformers"},
    "jobs": {"fastapi", "starlette", "api", "worker"},
    "worker": {"api"},
}
# What a process that imported all of ``api`` must not have loaded: jobs reaches trainer.config
# (the spec's validation, torch-free), never the training loop or torch.
LOADED_BY_API = {"worker", "torch", "transformers", "trainer.loop"}
BROKER_MODULES = {"jobs.broker", "jobs.chat_queue"}  # the only jobs modules that may import celery


def modules(package: str) -> list[str]:
    root = ROOT / package
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_names(path: Path) -> list[str]:
    """Every absolute module name that ``path`` imports, anywhere in it."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def source_offenders(package: str, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in imported_names(path)
        if name.split(".")[0] in forbidden
    ]


def loaded_after_importing(names: list[str], watched: set[str], tmp_path: Path) -> list[str]:
    """The ``watched`` modules (or packages) in ``sys.modules`` of a fresh process that imported ``names``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"watched = {sorted(watched)!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m in watched or m.split('.')[0] in watched)))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_")}
    env.update(GRPO_DATA_DIR=str(tmp_path), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_source_imports_only_what_the_design_allows(package: str) -> None:
    assert source_offenders(package, FORBIDDEN[package]) == []


def test_only_the_broker_modules_of_jobs_name_celery() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "jobs").rglob("*.py"))
        for name in imported_names(path)
        if name.split(".")[0] in {"celery", "kombu"}
        and ".".join(path.relative_to(ROOT).with_suffix("").parts) not in BROKER_MODULES
    ]
    assert offenders == []


def test_importing_all_of_api_loads_no_worker_trainer_loop_or_torch(tmp_path: Path) -> None:
    assert loaded_after_importing(modules("api"), LOADED_BY_API, tmp_path) == []


def test_importing_all_of_jobs_loads_no_web_framework_api_worker_or_torch(tmp_path: Path) -> None:
    # jobs reaches the trainer's torch-free modules (config, data parsing, rewards), never torch itself
    watched = FORBIDDEN["jobs"] | {"torch", "transformers", "trainer.loop"}
    assert loaded_after_importing(modules("jobs"), watched, tmp_path) == []


def test_jobs_without_its_broker_modules_loads_no_celery(tmp_path: Path) -> None:
    record = [name for name in modules("jobs") if name not in BROKER_MODULES]
    assert loaded_after_importing(record, {"celery", "kombu"}, tmp_path) == []


def test_importing_all_of_worker_loads_no_api(tmp_path: Path) -> None:
    assert loaded_after_importing(modules("worker"), FORBIDDEN["worker"], tmp_path) == []
