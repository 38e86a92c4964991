"""Generation backends: what samples a step's completions.

The loop sees one interface, ``Sampler``: ``generate`` returns a ``Rollout`` (with, where the
backend gives them, the log-prob of every sampled token under the distribution it was drawn
from, which the sampler/trainer mismatch correction needs), ``sync`` is called after every
optimizer step so that the next rollout samples from the updated policy, and ``close`` once at
the end of the run. ``hyperparameters.generation`` picks the backend: ``"hf"`` (the default, the
reference and the fallback) samples from the policy module itself; ``"vllm"`` drives a vLLM engine
(``trainer.generation.vllm``, imported only when asked for: vLLM is an optional extra).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from trainer.config import GRPOConfig
from trainer.generation.hf import HFSampler
from trainer.rollout import Rollout

__all__ = ["HFSampler", "Sampler", "make_sampler", "takes_group_seeds"]


class Sampler(Protocol):
    def generate(
        self,
        prompt_ids: list[torch.Tensor],  # B tensors [P_b], no padding
        *,
        group_size: int,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_id: int,
        temperature: float,  # 0: greedy
        top_p: float,
        generator: torch.Generator,
        group_seeds: Sequence[int] | None = None,  # [B]
    ) -> Rollout:
        """``group_size`` completions of each prompt, those of a prompt adjacent. Given
        ``group_seeds`` (one per prompt), prompt b's completions draw their randomness from
        ``group_seeds[b]`` alone, so that a group samples the same whichever other prompts share
        the call (a run on several processes splits each step's prompts between them); without,
        from ``generator``. A sampler may leave ``group_seeds`` out of its signature (see
        ``takes_group_seeds``): it is then called with ``generator`` alone."""
        ...

    def sync(self, model: torch.nn.Module) -> None:
        """Make the sampler sample from ``model``'s current weights (after an optimizer step)."""
        ...

    def close(self) -> None:
        """Release the backend's processes and memory; the sampler is not used after."""
        ...


def takes_group_seeds(sampler: Sampler) -> bool:
    """Whether ``sampler.generate`` takes ``group_seeds`` (a backend written before they existed
    does not, and keeps sampling each call from ``generator``)."""
    return "group_seeds" in inspect.signature(sampler.generate).parameters


def make_sampler(config: GRPOConfig, model: torch.nn.Module, **options: Any) -> Sampler:
    """The sampler ``config.generation`` names, sampling from ``model`` (the policy). ``options``
    are the backend's own (the HF sampler needs none)."""
    if config.generation == "hf":
        return HFSampler(model)
    from trainer.generation.vllm import VLLMSampler  # never imports vllm: the engine has its own env

    return VLLMSampler(config, model, **options)
