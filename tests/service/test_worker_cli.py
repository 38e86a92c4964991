"""``python -m worker``: a GPU training worker runs one job at a time on its devices, so Celery's
options that would run several at once (on the same GPUs) are refused with a one-line error. A
CPU worker may run several small jobs at once (the tests' own workers do)."""

from __future__ import annotations

import pytest

import worker.devices
from worker.__main__ import concurrency_option, main
from worker.devices import worker_devices


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--concurrency", "4"], "--concurrency"),
        (["--loglevel", "DEBUG", "--concurrency=2"], "--concurrency"),
        (["-c", "2"], "-c"),
        (["-c2"], "-c"),
        (["--autoscale=4,1"], "--autoscale"),
    ],
)
def test_a_gpu_training_worker_refuses_to_run_jobs_side_by_side(
    args: list[str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a machine with two GPUs looks like to the worker (this one has none); main() exits
    # before any worker starts
    monkeypatch.setattr(worker.devices, "cuda_device_count", lambda: 2)
    worker_devices.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            main(args)
    finally:
        worker_devices.cache_clear()
    message = str(exited.value.code)
    assert message.startswith(f"python -m worker: {named} is not for a GPU training worker"), message


def test_other_options_are_left_to_celery() -> None:
    assert [concurrency_option(arg) for arg in ["--loglevel", "-n", "w1@%h", "--pool=solo", "-Q", "gpu"]] == [
        None
    ] * 6
