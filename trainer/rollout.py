"""Rollout: sample G completions for each prompt of a step, all in one batched generation.

Each prompt is prefilled once and its KV cache repeated for its G completions (the cache of G
identical prompts is identical, so this is exact); decoding then runs all B*G sequences together
with the cache, stops a sequence at EOS (and drops finished sequences from the batch once a
quarter of it has finished) and the whole batch once every sequence has stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

PRUNE_WHEN_FINISHED = 4  # drop finished rows from the decoding batch once 1/4 of it has finished


@dataclass
class Rollout:
    prompt_ids: list[torch.Tensor]  # B tensors [P_b], no padding
    completion_ids: list[torch.Tensor]  # B*G tensors [L_i], up to and including EOS, no padding
    truncated: torch.Tensor  # [B*G] bool: hit max_completion_length without EOS


def sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Sample one token per row from softmax(logits) restricted to the top-p nucleus. [N, V] -> [N]

    Inverse-CDF sampling (the same distribution as ``torch.multinomial``, about ten times faster
    on a 32k vocabulary on CPU): the first token whose cumulative mass exceeds u ~ U[0, total).
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [N, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [N, V]
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # [N, V] mass before the token already > p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)  # [N, V]
    cdf = probs.cumsum(dim=-1)  # [N, V]
    if not torch.isfinite(cdf[:, -1]).all():  # any inf or NaN logit makes its row's total NaN
        raise FloatingPointError("sampling met inf or NaN probabilities: the model's outputs are no longer finite")
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # [N, 1]
    # right=True picks the first index with cdf > u, which always has positive mass
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # [N]


def repeat_rows(cache, rows: int, times: int) -> None:
    """Repeat each row of the cache ``times`` times, in place: keys and values of attention layers,
    and the conv / recurrent states of hybrid models' layers (which can only reorder)."""
    if all(hasattr(layer, "batch_repeat_interleave") for layer in cache.layers):
        cache.batch_repeat_interleave(times)
    else:
        cache.reorder_cache(torch.arange(rows).repeat_interleave(times))


def select_rows(cache, index: torch.Tensor) -> None:
    """Keep the cache's rows ``index`` [A'], in place (as ``repeat_rows`` does for hybrids)."""
    if all(hasattr(layer, "batch_select_indices") for layer in cache.layers):
        cache.batch_select_indices(index)
    else:
        cache.reorder_cache(index)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[torch.Tensor],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
) -> Rollout:
    device = next(model.parameters()).device
    batch, width = len(prompt_ids), max(p.shape[0] for p in prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)  # [B, P] left-padded
    attention_mask = torch.zeros((batch, width), dtype=torch.long, device=device)  # [B, P]
    for b, prompt in enumerate(prompt_ids):
        input_ids[b, width - prompt.shape[0]:] = prompt
        attention_mask[b, width - prompt.shape[0]:] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]

    cache = DynamicCache(config=getattr(model, "config", None))
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True, logits_to_keep=1)
    cache = out.cache
    repeat_rows(cache, batch, group_size)  # [B] rows -> [B*G]
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # [B*G, V]
    attention_mask = attention_mask.repeat_interleave(group_size, dim=0)  # [B*G, P]
    next_position = position_ids[:, -1:].repeat_interleave(group_size, dim=0) + 1  # [B*G, 1]

    eos = torch.tensor(eos_token_ids, device=device)
    rows = torch.arange(batch * group_size, device=device)  # [A] the completion each decoding row is
    finished = torch.zeros(batch * group_size, dtype=torch.bool, device=device)  # [A]
    generated = torch.full((batch * group_size, max_new_tokens), pad_id, dtype=torch.long, device=device)
    steps = 0
    for step in range(max_new_tokens):
        token = sample_top_p(logits / temperature if temperature != 1.0 else logits, top_p, generator)  # [A]
        token = token.masked_fill(finished, pad_id)
        generated[rows, step] = token
        steps = step + 1
        finished |= torch.isin(token, eos)
        if finished.all() or steps == max_new_tokens:
            break
        if int(finished.sum()) * PRUNE_WHEN_FINISHED >= finished.numel():
            # Enough rows are done to be worth a copy of the cache without them: the rest of
            # the decode costs what the unfinished rows cost. Their sampling draws change (the
            # batch is smaller), their distribution does not.
            keep = (~finished).nonzero().squeeze(-1)  # [A']
            select_rows(cache, keep)
            rows, finished, token = rows[keep], finished[keep], token[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)  # [A, P+t]
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1]  # [A, V]
        next_position = next_position + 1

    generated = generated[:, :steps].cpu()  # [B*G, T]
    is_eos = torch.isin(generated, eos.cpu())  # [B*G, T]
    has_eos = is_eos.any(dim=1)  # [B*G]
    lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, generated.shape[1])  # [B*G] EOS included
    return Rollout(
        prompt_ids=[p.cpu() for p in prompt_ids],
        completion_ids=[generated[i, : lengths[i]] for i in range(generated.shape[0])],
        truncated=~has_eos,
    )
