"""The Hugging Face sampler: batched generation from the policy module itself (trainer.rollout)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from trainer.rollout import Rollout, generate


@contextlib.contextmanager
def no_router_logits(model: torch.nn.Module) -> Iterator[None]:
    """Sampling needs no router logits: a MoE config with ``output_router_logits`` would make each
    cached decoding step compute a load-balancing loss against the whole attention mask (and
    fail). The training pass asks for them itself (``token_logprobs(router_aux_loss=True)``)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "output_router_logits", False):
        yield
        return
    text.output_router_logits = False
    try:
        yield
    finally:
        text.output_router_logits = True


class HFSampler:
    """Samples with ``trainer.rollout.generate`` from ``model``, in eval mode (no dropout). It
    samples from the very module the optimizer updates, so ``sync`` has nothing to copy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def generate(
        self,
        prompt_ids: list[torch.Tensor],
        *,
        group_size: int,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_id: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
        group_seeds: Sequence[int] | None = None,
    ) -> Rollout:
        device = next(self.model.parameters()).device
        draws = (
            generator
            if group_seeds is None
            else [torch.Generator(device).manual_seed(seed) for seed in group_seeds]
        )
        self.model.eval()
        with no_router_logits(self.model):
            rollout = generate(
                self.model,
                prompt_ids,
                group_size=group_size,
                max_new_tokens=max_new_tokens,
                eos_token_ids=eos_token_ids,
                pad_id=pad_id,
                temperature=temperature,
                top_p=top_p,
                generator=draws,
            )
        rollout.from_policy = True
        return rollout

    def sync(self, model: torch.nn.Module) -> None:
        """Nothing to copy: the optimizer updated the weights this sampler reads."""

    def close(self) -> None:
        """Nothing to release: the model is the run's."""
