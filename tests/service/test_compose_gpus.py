"""docker-compose.yml gives each one-GPU service its own GPU by index (``count: 1`` would give every
container the first GPU), and tells the API the workers train on CUDA."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def at_defaults(value: str) -> str:
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_the_one_gpu_services_have_a_gpu_each_and_the_api_knows_they_are_gpus() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpus = {}
    for name in ("worker", "inference"):
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device, name  # the first N GPUs, whatever else runs on them
        gpus[name] = [at_defaults(index) for index in device["device_ids"]]
    assert gpus == {"worker": ["0"], "inference": ["1"]}
    for name in ("api", "worker", "worker-multi-gpu", "inference"):
        assert at_defaults(services[name]["environment"]["GRPO_WORKER_DEVICE"]) == "cuda", name
