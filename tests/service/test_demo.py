"""The demo's claim, checked: a shortened `python -m demo` (40 GRPO steps instead of 100), through
the embedded service as a user runs it, raises accuracy on held-out problems by at least 5 points,
from the best checkpoint by eval reward; and the demo exits non-zero, saying why, when the rise
falls short of its --min-rise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.factories import ROOT

pytestmark = pytest.mark.slow

HEADLINE = re.compile(r"held-out accuracy: before GRPO ([\d.]+)%, after GRPO ([\d.]+)% \(([+-][\d.]+) points")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo directory for the module: the second run reuses the first one's warm-started model."""
    return tmp_path_factory.mktemp("demo")


def run_demo(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "demo", "--data-dir", str(data_dir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )


def test_a_shortened_demo_raises_held_out_accuracy_from_the_best_checkpoint(data_dir: Path) -> None:
    result = run_demo(data_dir, "--steps", "40", "--seed", "0")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    headline = HEADLINE.search(result.stdout)
    assert headline, output
    before, after, rise = map(float, headline.groups())
    assert after - before >= 5.0, output
    assert rise == pytest.approx(after - before, abs=0.15)
    best = re.search(r"downloading the best checkpoint by eval reward \(step (\d+)\)", result.stdout)
    assert best and 1 <= int(best.group(1)) <= 40, output
    assert "held-out accuracy of the warm-started model" in result.stdout  # measured before GRPO ran
    assert "500 problems never trained on" in result.stdout


def test_the_demo_fails_loudly_when_accuracy_does_not_rise_enough(data_dir: Path) -> None:
    # no run can rise 101 points: the check must fire, whatever the one step did
    result = run_demo(data_dir, "--steps", "1", "--seed", "0", "--min-rise", "101")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: held-out accuracy rose" in result.stderr
    assert "less than --min-rise 101" in result.stderr
    assert f"1. model and data (cached in {data_dir})\n" in result.stdout
    # the checkpoint's folder straight under downloaded/, not inside another of the same name
    loaded = re.search(r"from_pretrained\('([^']+)'\)", result.stdout)
    assert loaded, result.stdout
    model_dir = Path(loaded.group(1))
    assert model_dir.parent == data_dir / "downloaded" and (model_dir / "config.json").is_file()
    assert model_dir.name.startswith("job_") and model_dir.name.endswith("-step-1")
