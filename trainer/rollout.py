"""Rollout: sample G completions for each prompt of a step, all in one batched generation.

Each prompt is prefilled once and its KV cache repeated for its G completions (the cache of G
identical prompts is identical, so this is exact); decoding then runs all B*G sequences together
with the cache, stops a sequence at EOS (and drops finished sequences from the batch once a
quarter of it has finished) and the whole batch once every sequence has stopped. Full-attention
layers keep their keys and values in a buffer that grows geometrically (``GrowingLayer``), not by
concatenating every token onto the whole cache. Each completion gets its own uniform draw every
step, so which rows are still in the batch changes no token; given one generator per prompt, a
prompt's completions draw only from its own, so which other prompts share the batch changes none of
their draws either (what lets several processes split a step's prompts and sample as one would).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

HEAD_COPY_BYTES = 64 << 20  # the largest LM head that contiguous_head copies
PRUNE_WHEN_FINISHED = 4  # drop finished rows from the decoding batch once 1/4 of it has finished


@dataclass
class Rollout:
    prompt_ids: list[torch.Tensor]  # B tensors [P_b], no padding
    completion_ids: list[torch.Tensor]  # B*G tensors [L_i], up to and including EOS, no padding
    truncated: torch.Tensor  # [B*G] bool: hit max_completion_length without EOS
    # B*G tensors [L_i] float32: each token's log-prob under the distribution it was drawn from,
    # log softmax(logits / T)[token] before top-p (what the trainer's token_logprobs computes);
    # None where the sampler gives none (greedy decoding has no sampling distribution)
    sampler_logprobs: list[torch.Tensor] | None = None
    # drawn by the policy module itself (trainer.generation.HFSampler): its log-probs differ from
    # the trainer's only by the rounding of another computation path (~1e-7 a token in float32,
    # ~1e-2 in bfloat16), which the mismatch correction does not reweight (TRL: vLLM alone)
    from_policy: bool = False


def sample_top_p(
    logits: torch.Tensor,
    top_p: float,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
    *,
    with_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from softmax(logits) restricted to the top-p nucleus. [N, V] -> [N]

    Inverse-CDF sampling (the same distribution as ``torch.multinomial``, about ten times faster
    on a 32k vocabulary on CPU): the first token whose cumulative mass exceeds u ~ U[0, total).
    ``uniforms`` [N] in [0, 1) are the draws to use, else they come from ``generator``.
    With ``with_logprobs`` also each token's log-prob under softmax(logits) [N] (before top-p),
    read off the softmax already computed: log(p[token]) rather than a second full-vocabulary
    log_softmax pass, equal to it within float32 rounding (p is floored at the smallest normal
    float32, never log 0: a drawn token has mass, but underflow could still round it to zero).
    """
    full = probs = torch.softmax(logits.float(), dim=-1)  # [N, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [N, V]
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # [N, V] mass before the token already > p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)  # [N, V]
    cdf = probs.cumsum(dim=-1)  # [N, V]
    if not torch.isfinite(cdf[:, -1]).all():  # any inf or NaN logit makes its row's total NaN
        raise FloatingPointError(
            "sampling met inf or NaN probabilities: the model's outputs are no longer finite"
        )
    if uniforms is None:
        uniforms = torch.rand(cdf.shape[0], generator=generator, device=cdf.device)  # [N]
    u = uniforms[:, None] * cdf[:, -1:]  # [N, 1]
    # right=True picks the first index with cdf > u, which always has positive mass
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # [N]
    if not with_logprobs:
        return token
    picked = full.gather(-1, token[:, None]).squeeze(-1)  # [N]
    return token, picked.clamp(min=torch.finfo(picked.dtype).tiny).log()  # [N], [N]


def draw_uniforms(
    generator: torch.Generator | Sequence[torch.Generator],
    prompts: int,
    group_size: int,
    device: torch.device,
) -> torch.Tensor:
    """One uniform in [0, 1) for each of the ``prompts * group_size`` completions -> [B*G]: all from
    ``generator``, or, given one generator per prompt, prompt b's ``group_size`` from ``generator[b]``."""
    if isinstance(generator, torch.Generator):
        return torch.rand(prompts * group_size, generator=generator, device=device)  # [B*G]
    return torch.cat([torch.rand(group_size, generator=g, device=device) for g in generator])  # [B*G]


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in a buffer with room to grow.

    ``DynamicLayer`` concatenates every new token onto the whole cache, so decoding L tokens
    copies O(L^2) cache slots (at 2k-token completions that copy cost twice the attention
    itself). Here ``keys`` / ``values`` are views of the first ``t`` positions of a buffer that
    grows geometrically (doubling, never past ``max_length``): a token writes one slot, and the
    views hold exactly what concatenation would have returned.
    """

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # [A, H, capacity, D] each
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # what keys / values were last set to

    def _move_into(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """New buffers holding ``keys`` / ``values`` [A, H, t, D] with space for ``room`` more positions."""
        length = keys.shape[-2]
        capacity = max(length + room, min(2 * length, self.max_length))
        new = []
        for states in (keys, values):
            buffer = states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
            buffer[..., :length, :] = states
            new.append(buffer)
        self._buffers = (new[0], new[1])
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        self.keys, self.values = (b[..., :length, :] for b in self._buffers)
        self._views = (self.keys, self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if length == 0:
            self._move_into(key_states[..., :0, :], value_states[..., :0, :], new)
        elif (
            self._views is None
            or self._views[0] is not self.keys
            or self._views[1] is not self.values
            or length + new > self._buffers[0].shape[-2]
        ):  # full, or keys were replaced from outside
            self._move_into(self.keys, self.values, new)
        self._buffers[0][..., length : length + new, :] = key_states
        self._buffers[1][..., length : length + new, :] = value_states
        self._set_length(length + new)
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._move_into(
                self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0), 0
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._move_into(self.keys[indices], self.values[indices], 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.keys.device))

    def reset(self) -> None:
        self._buffers = self._views = None
        super().reset()


def new_cache(model: torch.nn.Module, max_length: int) -> DynamicCache:
    """The model's dynamic cache with its full-attention layers (exactly ``DynamicLayer``: not
    sliding-window, linear-attention or other kinds, which keep their own) growing in place."""
    cache = DynamicCache(config=getattr(model, "config", None))
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = GrowingLayer(max_length)
    return cache


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


@contextlib.contextmanager
def contiguous_head(model: torch.nn.Module) -> Iterator[None]:
    """The LM head computing ``hidden @ W^T`` from a contiguous copy of ``W^T`` [H, V] while
    sampling, when it is a plain bias-free linear map on the CPU and the copy is small
    (HEAD_COPY_BYTES). Decoding feeds it a few rows at a time, where the matmul is bound by
    streaming the weight, and MKL streams ``[H, V]`` about a third faster than the transposed
    ``[V, H]``. The model's own forward still runs around it (its logit transforms included)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if (
        type(head) is not torch.nn.Linear
        or head.bias is not None
        or weight.device.type != "cpu"
        or weight.numel() * weight.element_size() > HEAD_COPY_BYTES
        or "forward" in vars(head)
    ):
        yield
        return
    transposed = weight.detach().T.contiguous()  # [H, V]
    head.forward = lambda hidden: hidden @ transposed  # [.., H] -> [.., V]
    try:
        yield
    finally:
        del head.forward


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
    generator: torch.Generator | Sequence[torch.Generator],
) -> Rollout:
    """``group_size`` completions of each prompt, sampled at ``temperature`` (0: greedy) within the
    top-p nucleus; ``generator`` is one generator for the whole batch, or one per prompt (then a
    prompt's completions are the same whatever other prompts share the call)."""
    if not isinstance(generator, torch.Generator) and len(generator) != len(prompt_ids):
        raise ValueError(f"{len(generator)} generators for {len(prompt_ids)} prompts: give one per prompt")
    with contiguous_head(model):
        return _generate(
            model,
            prompt_ids,
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos_token_ids,
            pad_id=pad_id,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
        )


def _generate(
    model: torch.nn.Module,
    prompt_ids: list[torch.Tensor],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | Sequence[torch.Generator],
) -> Rollout:
    device = next(model.parameters()).device
    batch, width = len(prompt_ids), max(p.shape[0] for p in prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)  # [B, P] left-padded
    attention_mask = torch.zeros((batch, width), dtype=torch.long, device=device)  # [B, P]
    for b, prompt in enumerate(prompt_ids):
        input_ids[b, width - prompt.shape[0] :] = prompt
        attention_mask[b, width - prompt.shape[0] :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]

    cache = new_cache(model, width + max_new_tokens)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache
    repeat_rows(cache, batch, group_size)  # [B] rows -> [B*G]
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # [B*G, V]
    attention_mask = attention_mask.repeat_interleave(group_size, dim=0)  # [B*G, P]
    next_position = position_ids[:, -1:].repeat_interleave(group_size, dim=0) + 1  # [B*G, 1]

    eos = torch.tensor(eos_token_ids, device=device)
    rows = torch.arange(batch * group_size, device=device)  # [A] the completion each decoding row is
    finished = torch.zeros(batch * group_size, dtype=torch.bool, device=device)  # [A]
    generated = torch.full((batch * group_size, max_new_tokens), pad_id, dtype=torch.long, device=device)
    sampled = temperature != 0
    logprobs = torch.zeros((batch * group_size, max_new_tokens) if sampled else (0, 0), device=device)
    steps = 0
    for step in range(max_new_tokens):
        if temperature == 0:  # greedy (evaluation): the argmax, as HF generate(do_sample=False)
            token = logits.argmax(dim=-1)  # [A]
        else:
            # One draw for every completion, finished or dropped or not, each step: a completion's
            # tokens do not depend on which other rows are still in the batch.
            uniforms = draw_uniforms(generator, batch, group_size, device)[rows]  # [A]
            token, logprob = sample_top_p(
                logits.float() / temperature if temperature != 1.0 else logits,  # in float32, as scored
                top_p,
                None,
                uniforms,
                with_logprobs=True,
            )  # [A], [A]
            logprobs[rows, step] = logprob
        token = token.masked_fill(finished, pad_id)
        generated[rows, step] = token
        steps = step + 1
        finished |= torch.isin(token, eos)
        done = int(finished.sum())  # the step's one read of a device value
        if done == finished.numel() or steps == max_new_tokens:
            break
        if done * PRUNE_WHEN_FINISHED >= finished.numel():
            # Enough rows are done to be worth a copy of the cache without them: the rest of
            # the decode costs what the unfinished rows cost. Each row keeps its own draws
            # (above), so dropping rows changes no token.
            keep = (~finished).nonzero().squeeze(-1)  # [A']
            select_rows(cache, keep)
            rows, finished, token = rows[keep], finished[keep], token[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)  # [A, P+t]
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]  # [A, V]
        next_position = next_position + 1

    generated = generated[:, :steps].cpu()  # [B*G, T]
    logprobs = logprobs[:, :steps].cpu()  # [B*G, T] (greedy: [0, 0])
    is_eos = torch.isin(generated, eos.cpu())  # [B*G, T]
    has_eos = is_eos.any(dim=1)  # [B*G]
    lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, generated.shape[1])  # [B*G] EOS included
    return Rollout(
        prompt_ids=[p.cpu() for p in prompt_ids],
        completion_ids=[generated[i, : lengths[i]] for i in range(generated.shape[0])],
        truncated=~has_eos,
        sampler_logprobs=[logprobs[i, : lengths[i]] for i in range(generated.shape[0])] if sampled else None,
    )
