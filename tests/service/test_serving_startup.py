"""The serving vLLM engine's start-up memory check: on a GPU the engine is told the share of the
GPU that is free now (``--gpu-memory-utilization``, vLLM's default 0.9 would refuse to start beside
another engine, warm checkpoints or a training worker); on a CPU nothing is added. The CUDA branch
needs a GPU and is not exercised here."""

from __future__ import annotations

import torch

from worker.vllm_serving import startup_memory_args


def test_an_engine_on_a_cpu_gets_no_gpu_memory_flag() -> None:
    assert startup_memory_args(torch.device("cpu")) == []
