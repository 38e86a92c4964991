"""The GRPO math as pure functions over tensors.

Completion tokens are *flat*: the tokens of every completion in a step laid end to end, with
``seq_index[n]`` saying which completion token ``n`` belongs to. That is the layout the packed
forward pass produces (no padding anywhere); the padded ``[B, T]`` layout of TRL maps onto it by
``flat = padded[mask]``, which is how the tests compare against hand-computed values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-8  # added to the std before dividing, as in the GRPO paper and TRL


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage of each completion: its reward minus its group's mean, scaled.

    rewards: [B*G], grouped consecutively (the G completions of a prompt are adjacent).
    scale: "group" divides by each group's std (+1e-8), "batch" by the whole batch's std (+1e-8),
    "none" leaves the centred rewards (Dr. GRPO). Stds are unbiased, as torch.std and TRL.
    Returns (advantages [B*G], zero_std [B]: the groups whose rewards are all equal).
    """
    grouped = rewards.view(-1, group_size)  # [B, G]
    mean = grouped.mean(dim=1, keepdim=True)  # [B, 1]
    std = grouped.std(dim=1, keepdim=True)  # [B, 1]
    zero_std = torch.isclose(std.squeeze(1), torch.zeros_like(std.squeeze(1)))  # [B]
    centred = grouped - mean  # [B, G]
    if scale == "group":
        centred = centred / (std + STD_EPS)
    elif scale == "batch":
        centred = centred / (rewards.std() + STD_EPS)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}; expected one of group, batch, none")
    return centred.reshape(-1), zero_std  # [B*G], [B]


def per_sequence_mean(values: torch.Tensor, seq_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Mean of ``values`` [N] over each sequence's tokens -> [num_sequences] (0 for an empty one)."""
    sums = values.new_zeros(num_sequences).index_add(0, seq_index, values)  # [S]
    counts = values.new_zeros(num_sequences).index_add(0, seq_index, torch.ones_like(values))  # [S]
    return sums / counts.clamp(min=1.0)  # [S]


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): r - log r - 1 with r = pi_ref / pi. [N] -> [N], >= 0."""
    log_r = ref_logps - logps  # [N]
    return torch.exp(log_r) - log_r - 1.0  # [N]


def importance_ratio(
    logps: torch.Tensor,  # [N] log pi(token) under the policy being trained
    old_logps: torch.Tensor,  # [N] log pi_old(token) under the policy that sampled it
    seq_index: torch.Tensor,  # [N] completion each token belongs to
    num_sequences: int,
    importance_sampling_level: str = "token",
) -> torch.Tensor:
    """The importance ratio r = pi / pi_old of each token [N]: per token, or (GSPO's sequence
    level) exp of the mean token log-ratio of its completion, broadcast onto its tokens."""
    log_ratio = logps - old_logps  # [N]
    if importance_sampling_level == "sequence":
        log_ratio = per_sequence_mean(log_ratio, seq_index, num_sequences)[seq_index]  # [N]
    elif importance_sampling_level != "token":
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; expected token or sequence"
        )
    return torch.exp(log_ratio)  # [N]


@dataclass
class SamplerCorrection:
    weights: torch.Tensor | None  # [N] what multiplies each token's policy loss; None: no correction
    ratio: torch.Tensor  # [N] pi_old / pi_sampler before the cap (sequence modes: its completion's)
    cut: torch.Tensor  # [N] bool: the ratio is above the cap, so its weight was truncated or zeroed


def sampler_correction(
    old_logps: torch.Tensor,  # [N] log pi_old(token): the trainer's, under the policy that sampled it
    sampler_logps: torch.Tensor,  # [N] log q(token): the sampler's own, as it drew the token
    seq_index: torch.Tensor,  # [N] completion each token belongs to
    num_sequences: int,
    mode: str | None,
    cap: float,
) -> SamplerCorrection:
    """Importance weights pi_old / q for tokens drawn from a sampler q (a vLLM engine, another
    precision) that differs from the policy pi_old the trainer computes: TRL's
    ``vllm_importance_sampling_correction`` and verl's rollout importance sampling (TIS / MIS).

    token_*:    r = exp(log pi_old - log q) of each token
    sequence_*: r = exp of the *sum* of its completion's token log-ratios (as TRL), on every token
    *_truncate: weight = min(r, cap)
    *_mask:     weight = r, or 0 where r > cap (the token, or the whole completion, drops out)
    None:       no weights (the ratio still says how far apart the two are)
    """
    log_ratio = old_logps - sampler_logps  # [N]
    if mode is not None and mode.startswith("sequence_"):
        sums = log_ratio.new_zeros(num_sequences).index_add(0, seq_index, log_ratio)  # [S]
        log_ratio = sums[seq_index]  # [N]
    ratio = torch.exp(log_ratio)  # [N]
    cut = ratio > cap  # [N]
    if mode is None:
        return SamplerCorrection(weights=None, ratio=ratio, cut=torch.zeros_like(cut))
    if mode in ("token_truncate", "sequence_truncate"):
        weights = torch.clamp(ratio, max=cap)  # [N]
    elif mode in ("token_mask", "sequence_mask"):
        weights = ratio.masked_fill(cut, 0.0)  # [N]
    else:
        raise ValueError(
            f"unknown sampler_correction {mode!r}; expected one of token_truncate, token_mask, "
            "sequence_truncate, sequence_mask, or None"
        )
    return SamplerCorrection(weights=weights, ratio=ratio, cut=cut)


@dataclass
class TokenLoss:
    loss: torch.Tensor  # [N] per-token loss, to be aggregated
    low_clipped: torch.Tensor  # [N] bool: ratio < 1 - eps where the advantage is negative
    high_clipped: torch.Tensor  # [N] bool: ratio > 1 + eps_high where the advantage is positive
    kl: torch.Tensor | None  # [N] per-token k3 KL, None when beta = 0


def clipped_token_loss(
    logps: torch.Tensor,  # [N] log pi(token) under the policy being trained
    old_logps: torch.Tensor,  # [N] log pi_old(token) under the policy that sampled it
    advantages: torch.Tensor,  # [N] each token carries its completion's advantage
    seq_index: torch.Tensor,  # [N] completion each token belongs to
    num_sequences: int,
    *,
    epsilon: float,
    epsilon_high: float,
    delta: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,  # [N] log pi_ref(token); needed when beta > 0
    importance_sampling_level: str = "token",
    sampler_weights: torch.Tensor | None = None,  # [N] sampler_correction's weights, None: all 1
) -> TokenLoss:
    """Per-token PPO-style clipped surrogate with an optional k3 KL penalty (TRL's GRPO loss).

    loss = -w * min(r * A, clip(r, 1 - eps, 1 + eps_high) * A) + beta * KL, with r capped at
    ``delta`` in the unclipped term when ``delta`` is set (two-sided clipping) and w the
    sampler-mismatch weight (``sampler_correction``; TRL weighs the policy term, not the KL).
    With sequence-level importance sampling (GSPO) log r is the mean of the token log-ratios of
    its completion.
    """
    ratio = importance_ratio(logps, old_logps, seq_index, num_sequences, importance_sampling_level)  # [N]
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)  # [N]
    unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio  # [N]
    loss = -torch.min(unclipped * advantages, clipped * advantages)  # [N]
    if sampler_weights is not None:
        loss = loss * sampler_weights  # [N]
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = kl_k3(logps, ref_logps)  # [N]
        loss = loss + beta * kl
    return TokenLoss(
        loss=loss,
        low_clipped=(ratio < 1.0 - epsilon) & (advantages < 0),
        high_clipped=(ratio > 1.0 + epsilon_high) & (advantages > 0),
        kl=kl,
    )


def aggregate_loss(
    token_loss: torch.Tensor,  # [N] per-token loss of the completions in this micro-batch
    seq_index: torch.Tensor,  # [N] index of each token's completion within this micro-batch
    num_micro_sequences: int,
    loss_type: str,
    *,
    num_sequences: int,  # completions in the whole step (all micro-batches, skipped ones included)
    num_tokens: int,  # loss-bearing completion tokens in the whole step
    max_completion_length: int,
) -> torch.Tensor:
    """This micro-batch's share of the step's scalar loss, normalised by whole-step counts so that
    summing the shares of all micro-batches gives exactly the full-batch loss (and gradient).

    grpo:    mean over completions of the mean over its tokens (length-biased; the GRPO paper)
    bnpo:    sum over tokens / tokens in the step
    dapo:    sum over tokens / tokens in the step (DAPO's token-level loss; in TRL bnpo and dapo
             differ only in whether the count is per device or global: one step here is global)
    dr_grpo: sum over tokens / (completions * max_completion_length) (Dr. GRPO, no length bias)
    """
    if loss_type == "grpo":
        return per_sequence_mean(token_loss, seq_index, num_micro_sequences).sum() / num_sequences
    if loss_type in ("bnpo", "dapo"):
        return token_loss.sum() / max(num_tokens, 1)
    if loss_type == "dr_grpo":
        return token_loss.sum() / (num_sequences * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of grpo, bnpo, dr_grpo, dapo")
