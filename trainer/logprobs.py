"""Per-token log-probabilities of completions, computed the lean way.

Two ideas make this faster and smaller than the textbook ``log_softmax(model(ids).logits)``:

1. *Shared-prefix packing.* The G completions of a prompt share its tokens, so each group is one
   row ``[prompt, c_1, ..., c_G]`` with positions restarting after the prompt and an attention
   mask in which c_i sees the prompt and its own earlier tokens only. The prompt is computed once
   per group instead of G times, its gradient is the sum over the group (exactly what G separate
   rows would give), and no completion is padded to the longest one.
2. *Chunked vocabulary projection.* Only the hidden states that predict completion tokens go
   through the LM head, in chunks, inside an autograd function that keeps no ``[N, V]`` tensor
   alive: the backward pass recomputes each chunk's logits. The simple equivalent is
   ``torch.log_softmax(hidden @ weight.T / T, -1).gather(-1, targets)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class _ChunkedSelectedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        # hidden [N, H], weight [V, H], targets [N]
        logps = hidden.new_empty(targets.shape[0], dtype=torch.float32)  # [N]
        lse = hidden.new_empty(targets.shape[0], dtype=torch.float32)  # [N] kept for backward
        entropy = hidden.new_empty(targets.shape[0] if with_entropy else 0, dtype=torch.float32)  # [N] or [0]
        for start in range(0, targets.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end] @ weight.T).float() / temperature  # [n, V]
            peak = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            exps = torch.exp(logits - peak)  # [n, V] the one exponential pass
            total = exps.sum(-1)  # [n]
            lse[start:end] = peak.squeeze(-1) + torch.log(total)
            logps[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - lse[start:end]
            if with_entropy:  # H = lse - sum(p * logits), p = exps / total
                entropy[start:end] = lse[start:end] - (exps * logits).sum(-1) / total
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # [N, H]
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None  # [V, H]
        for start in range(0, targets.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            logits = (hidden[start:end] @ weight.T).float() / ctx.temperature  # [n, V]
            # d logp(target) / d logits = onehot(target) - softmax(logits), softmax = exp(logits - lse)
            grad_logits = torch.exp(logits.sub_(lse[start:end, None])).neg_()  # [n, V]
            grad_logits.scatter_add_(-1, targets[start:end, None], torch.ones_like(grad_logits[:, :1]))
            grad_logits *= grad_logps[start:end, None] / ctx.temperature
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ hidden[start:end].float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def selected_logprobs(
    hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, *, temperature: float = 1.0,
    chunk_size: int = 1024, with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(lm_head(hidden) / T)[target] and the distribution's entropy, per row, in chunks.

    hidden [N, H], targets [N] -> (logps [N] float32, differentiable; entropy [N] float32, not,
    or None without ``with_entropy``: the reference and old-policy passes need only log-probs).
    """
    if isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        logps, entropy = _ChunkedSelectedLogProbs.apply(hidden, lm_head.weight, targets, temperature, chunk_size,
                                                        with_entropy)
        return logps, entropy if with_entropy else None
    # An LM head that is not a plain linear map (e.g. wrapped by an adapter): chunk it all the same,
    # letting autograd keep each chunk's logits.
    logps, entropies = [], []
    for start in range(0, targets.shape[0], chunk_size):
        logits = lm_head(hidden[start:start + chunk_size]).float() / temperature  # [n, V]
        log_probs = torch.log_softmax(logits, dim=-1)  # [n, V]
        logps.append(log_probs.gather(-1, targets[start:start + chunk_size, None]).squeeze(-1))
        if with_entropy:
            entropies.append(-(log_probs.exp() * log_probs).sum(-1).detach())
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


@dataclass
class Group:
    """One prompt and the completions of it that a forward pass needs (token ids, no padding)."""

    prompt: torch.Tensor  # [P]
    completions: list[torch.Tensor]  # each [L_i], L_i >= 1


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, S] one row per group, right-padded
    position_ids: torch.Tensor  # [R, S]
    attention_mask: torch.Tensor  # [R, 1, S, S] additive float mask
    predict_from: torch.Tensor  # [N] flat index into [R*S] of the hidden state predicting each target
    targets: torch.Tensor  # [N] completion token ids, completion after completion


def pack_groups(groups: list[Group], *, pad_id: int, dtype: torch.dtype, device: torch.device) -> PackedBatch:
    """Lay each group out as ``[prompt, c_1, ..., c_G]`` with a shared-prefix attention mask."""
    lengths = [g.prompt.shape[0] + sum(c.shape[0] for c in g.completions) for g in groups]
    rows, width = len(groups), max(lengths)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # [R, S]
    position_ids = torch.zeros((rows, width), dtype=torch.long)  # [R, S]
    allowed = torch.zeros((rows, width, width), dtype=torch.bool)  # [R, S, S] query x key
    predict_from, targets = [], []
    for r, group in enumerate(groups):
        plen = group.prompt.shape[0]
        input_ids[r, :plen] = group.prompt
        position_ids[r, :plen] = torch.arange(plen)
        allowed[r, :plen, :plen] = torch.ones(plen, plen, dtype=torch.bool).tril()
        start = plen
        for completion in group.completions:
            clen = completion.shape[0]
            end = start + clen
            input_ids[r, start:end] = completion
            position_ids[r, start:end] = torch.arange(plen, plen + clen)
            allowed[r, start:end, :plen] = True
            allowed[r, start:end, start:end] = torch.ones(clen, clen, dtype=torch.bool).tril()
            # token j of the completion is predicted by the state before it: the prompt's last
            # token for j = 0, else the completion's own token j - 1
            before = torch.cat([torch.tensor([plen - 1]), torch.arange(start, end - 1)])  # [L_i]
            predict_from.append(r * width + before)
            targets.append(completion)
            start = end
        allowed[r, start:, start:] = torch.eye(width - start, dtype=torch.bool)  # padding sees itself only
    mask = torch.zeros((rows, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return PackedBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=mask.to(device),
        predict_from=torch.cat(predict_from).to(device),
        targets=torch.cat(targets).to(device),
    )


def model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, LM head) of a Hugging Face causal LM, or of the one inside a peft model."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings()


def completion_logprobs(
    model: nn.Module, batch: PackedBatch, *, temperature: float, chunk_size: int, with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs and entropies of every completion packed in ``batch`` under ``model``
    (a Hugging Face causal LM, or a peft model around one). Returns flat tensors (logps [N],
    entropy [N], or None without ``with_entropy``) in the order the groups list their completions."""
    decoder, lm_head = model_parts(model)
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state  # [R, S, H]
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.predict_from]  # [N, H]
    return selected_logprobs(hidden, lm_head, batch.targets, temperature=temperature, chunk_size=chunk_size,
                             with_entropy=with_entropy)
