"""The house style, enforced: `ruff check` (pycodestyle with the 110-column limit, pyflakes, import
order, bugbear, pyupgrade) and `ruff format --check` over the whole tree, as `make lint` runs them.
ruff is pinned in pyproject.toml, so a newer release cannot change what passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_the_tree_is_clean_under_ruff(command: list[str]) -> None:
    done = subprocess.run([str(RUFF), *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
