"""The GRPO math against hand-computed values."""

import math

import pytest
import torch
from torch.testing import assert_close

from trainer.loss import aggregate_loss, clipped_token_loss, group_advantages, importance_ratio, kl_k3


def test_seed_example_rewards_give_equal_and_opposite_advantages():
    advantages, zero_std = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), group_size=4)
    # mean 0.5, unbiased std sqrt(1/3): each advantage is +-0.5 / 0.57735 = +-0.866025
    assert_close(advantages, torch.tensor([0.866025, -0.866025, 0.866025, -0.866025]), atol=1e-5, rtol=0)
    assert advantages.sum().abs() < 1e-6
    assert zero_std.tolist() == [False]


def test_all_equal_rewards_give_zero_advantages_and_count_as_zero_std():
    advantages, zero_std = group_advantages(torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0, 1.0]), group_size=3)
    assert_close(advantages[:3], torch.zeros(3))
    assert zero_std.tolist() == [True, False]


def test_scale_rewards_none_and_batch():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    none, _ = group_advantages(rewards, 4, "none")
    assert_close(none, torch.tensor([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]))
    batch, _ = group_advantages(rewards, 4, "batch")
    # batch std: mean 1.75, squared deviations 13.5 / 7 -> std 1.388730; 0.5 / 1.388730 = 0.360041
    assert_close(
        batch, torch.tensor([0.360041, -0.360041, 0.360041, -0.360041, 0, 0, 0, 0]), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="expected one of group, batch, none"):
        group_advantages(rewards, 4, "per_token")


def _loss(ratios, advantages, **kwargs):
    ratios = torch.tensor(ratios)
    n = ratios.shape[0]
    options = dict(epsilon=0.2, epsilon_high=0.28)
    options.update(kwargs)
    return clipped_token_loss(
        torch.log(ratios), torch.zeros(n), torch.tensor(advantages), torch.arange(n), n, **options
    )


def test_clipped_objective_inside_and_outside_the_clip_range():
    out = _loss([1.1, 1.5, 1.5, 0.5, 0.5], [2.0, 2.0, -1.0, -1.0, 2.0])
    # inside: -1.1*2; above with A>0: clipped at 1.28*2; above with A<0: unclipped -1.5 is the min;
    # below with A<0: clipped at 0.8*-1; below with A>0: unclipped 0.5*2 is the min
    assert_close(out.loss, torch.tensor([-2.2, -2.56, 1.5, 0.8, -1.0]))
    assert out.high_clipped.tolist() == [False, True, False, False, False]
    assert out.low_clipped.tolist() == [False, False, False, True, False]
    assert out.kl is None


def test_delta_caps_the_unclipped_ratio():
    out = _loss([1.5, 1.1], [-1.0, -1.0], delta=1.4)
    assert_close(out.loss, torch.tensor([1.4, 1.1]))


def test_k3_kl_term():
    logps, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3]))
    # r = 0.5: 0.5 - log 0.5 - 1 = 0.193147; r = 1: 0
    assert_close(kl_k3(logps, ref), torch.tensor([0.193147, 0.0]), atol=1e-6, rtol=0)
    out = clipped_token_loss(
        logps,
        logps.detach(),
        torch.tensor([1.0, 1.0]),
        torch.arange(2),
        2,
        epsilon=0.2,
        epsilon_high=0.2,
        beta=0.1,
        ref_logps=ref,
    )
    assert_close(out.loss, torch.tensor([-1.0 + 0.0193147, -1.0]), atol=1e-6, rtol=0)


def test_sequence_level_ratio_is_the_mean_token_log_ratio():
    log_ratio = torch.tensor([0.1, 0.3, -0.05])
    seq_index = torch.tensor([0, 0, 1])
    out = clipped_token_loss(
        log_ratio,
        torch.zeros(3),
        torch.tensor([1.0, 1.0, 1.0]),
        seq_index,
        2,
        epsilon=0.2,
        epsilon_high=0.2,
        importance_sampling_level="sequence",
    )
    ratio = importance_ratio(log_ratio, torch.zeros(3), seq_index, 2, importance_sampling_level="sequence")
    assert_close(ratio, torch.tensor([math.exp(0.2), math.exp(0.2), math.exp(-0.05)]))
    # the loss uses that ratio: e^0.2 = 1.2214 is clipped to 1.2 (token level, e^0.1 would not be);
    # e^-0.05 is inside
    assert_close(out.loss, torch.tensor([-1.2, -1.2, -math.exp(-0.05)]))
    assert out.high_clipped.tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("loss_type", "expected"), [("grpo", 3.0), ("bnpo", 2.5), ("dapo", 2.5), ("dr_grpo", 1.0)]
)
def test_aggregation_per_loss_type(loss_type, expected):
    token_loss = torch.tensor([1.0, 2.0, 3.0, 4.0])  # completion 0: [1, 2, 3], completion 1: [4]
    seq_index = torch.tensor([0, 0, 0, 1])
    full = aggregate_loss(
        token_loss, seq_index, 2, loss_type, num_sequences=2, num_tokens=4, max_completion_length=5
    )
    assert_close(full, torch.tensor(expected))
    # the same step cut into two micro-batches sums to the same loss
    parts = aggregate_loss(
        token_loss[:3], seq_index[:3], 1, loss_type, num_sequences=2, num_tokens=4, max_completion_length=5
    )
    parts = parts + aggregate_loss(
        token_loss[3:],
        torch.tensor([0]),
        1,
        loss_type,
        num_sequences=2,
        num_tokens=4,
        max_completion_length=5,
    )
    assert_close(parts, torch.tensor(expected))


def test_zero_advantage_completion_has_zero_gradient_without_kl():
    logps = torch.log(torch.tensor([0.3, 0.6])).requires_grad_()
    out = clipped_token_loss(
        logps,
        logps.detach() - 0.1,
        torch.tensor([0.0, 1.0]),
        torch.arange(2),
        2,
        epsilon=0.2,
        epsilon_high=0.2,
    )
    out.loss.sum().backward()
    assert logps.grad[0] == 0 and logps.grad[1] != 0
