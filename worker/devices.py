"""The devices a training worker runs jobs on: what it declares (``GRPO_WORKER_DEVICES``), or what
it finds. Named as a job's record shows them: ``cuda:0``, ``cuda:1``, ...; on a machine without
CUDA, ``cpu`` once per process a job may run."""

from __future__ import annotations

from functools import cache


class DeviceError(ValueError):
    """The declared devices are not there; the message says how to fix the setting."""


def cuda_device_count() -> int:
    """CUDA devices torch sees (0 without CUDA). Imported here, late: only a training worker
    needs torch for this. Through NVML where it can, which leaves the pool processes this
    worker forks free to start CUDA themselves."""
    import torch

    return torch.cuda.device_count()


@cache
def worker_devices(declared: int | None) -> tuple[str, ...]:
    """The devices of a worker that declares ``declared`` (None: every CUDA device there is, else
    one process). Computed once per process: the pool processes a worker forks inherit it."""
    return name_devices(declared, cuda_device_count())


def name_devices(declared: int | None, cuda: int) -> tuple[str, ...]:
    """``declared`` devices (None: all ``cuda``, else 1) named on a machine with ``cuda`` CUDA
    devices; ``DeviceError`` if it declares more GPUs than there are."""
    if cuda == 0:
        return ("cpu",) * (declared or 1)
    if declared is not None and declared > cuda:
        raise DeviceError(
            f"GRPO_WORKER_DEVICES is {declared}, but this worker sees {cuda} CUDA device"
            f"{'s' if cuda > 1 else ''} (CUDA_VISIBLE_DEVICES decides which): declare at most {cuda}, "
            "or leave it unset to use every one"
        )
    return tuple(f"cuda:{index}" for index in range(declared or cuda))
