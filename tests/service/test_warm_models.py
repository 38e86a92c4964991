"""The inference worker's warm checkpoints: the least recently used one is unloaded before the
next is loaded, so that at most ``GRPO_INFERENCE_MODELS`` models are in memory (on a GPU, the
next load would otherwise find the evicted model's memory still taken)."""

from __future__ import annotations

import weakref
from pathlib import Path

import worker.inference as inference
from worker.inference import Source, WarmModels


def test_the_evicted_model_is_gone_before_the_next_one_loads(tiny_model: Path, monkeypatch) -> None:
    real_load = inference.load
    alive_at_load: list[int] = []
    loaded: list[weakref.ref] = []

    def load_watching(source: Source):  # the real load, counting the models still alive when it starts
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        model, tokenizer = real_load(source)
        loaded.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(inference, "load", load_watching)
    warm = WarmModels(capacity=1)
    first, second = (Source(key=(job, "1"), directory=tiny_model, base_model=None) for job in ("a", "b"))

    model, _ = warm.get(first)
    assert warm.get(first)[0] is model  # warm: not loaded again
    del model
    model, _ = warm.get(second)  # evicts the first
    assert warm.loads == 2 and list(warm.loaded) == [second.key]
    assert alive_at_load == [0, 0]  # the first model was freed before the second load started
    assert loaded[0]() is None and loaded[1]() is model
