"""``vllm_server.classify_start_error`` on vLLM 0.32's own start-up errors, as ``main`` writes them
(``traceback.format_exception_only``): the text of each is vLLM's, from v1/core/kv_cache_utils.py,
v1/worker/cpu_worker.py and torch, with example numbers filled in."""

from __future__ import annotations

import pytest

from trainer.generation.vllm_server import classify_start_error

DOCS = "See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."

KV_CACHE = {
    # --max-model-len -1 (the inference worker's engines) and a cache too small for one token
    "auto-fit": "ValueError: Cannot auto-fit max_model_len: not enough GPU memory available "
    "to serve even a single token. Try increasing `gpu_memory_utilization`.",
    # a fixed --max-model-len (the trainer's sampler) longer than the cache holds
    "one sequence": "ValueError: To serve at least one request with the model's max seq len (156), "
    "(0.01 GiB KV cache is needed, which is larger than the available KV cache memory (0.0 GiB). "
    "Based on the available memory, the estimated maximum model length is 32. Try increasing "
    "`gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing "
    f"`max_model_len` when initializing the engine. {DOCS}",
    "no memory": "ValueError: No available memory for the cache blocks. Try increasing "
    "`gpu_memory_utilization` when initializing the engine (this flag also controls CPU memory "
    f"reservation on the CPU backend, despite its name). {DOCS}",
}
MEMORY = {
    "cpu allocation": "ValueError: Available memory on node 0 (0.5/7.7 GiB) on kv cache allocation is "
    "less than requested memory for kv (1.0 GiB). Decrease --kv-cache-memory-bytes, "
    "VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other processes.",
    "cuda": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
    "total capacity of 79.19 GiB of which 1.06 GiB is free.",
}


@pytest.mark.parametrize("message", KV_CACHE.values(), ids=KV_CACHE.keys())
def test_a_kv_cache_too_small_is_told_apart(message: str) -> None:
    assert classify_start_error(message) == "kv_cache"


@pytest.mark.parametrize("message", MEMORY.values(), ids=MEMORY.keys())
def test_other_memory_failures_are_memory(message: str) -> None:
    assert classify_start_error(message) == "memory"


def test_anything_else_is_other() -> None:
    message = "OSError: /models/none does not appear to have a file named config.json."
    assert classify_start_error(message) == "other"
