"""The shortcuts of a training step change nothing: micro-batching, skipping zero-advantage
completions (beta = 0) and scoring each prompt once per group give the gradient of the plain
full-batch loss."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.batch import ScoredGroups, plan_micro_batches
from trainer.config import GRPOConfig
from trainer.logprobs import PLAIN, Scoring
from trainer.loop import optimize
from trainer.loss import group_advantages
from trainer.model import Models

G = 4


def _batch(rewards):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (n,), generator=g) for n in (6, 3, 5)]
    completions = [
        torch.randint(4, 100, (int(n),), generator=g) for n in torch.randint(1, 7, (3 * G,), generator=g)
    ]
    return ScoredGroups(
        row_indices=[0, 1, 2],
        prompt_ids=prompts,
        completion_ids=completions,
        prompts=["", "", ""],
        completions=[""] * (3 * G),
        truncated=torch.zeros(3 * G, dtype=torch.bool),
        rewards=torch.tensor(rewards),
        parts={},
        errors={},
        error_messages=[],
    )


def _gradients(model_dir, batch, cfg, *, token_budget, skip_zero_advantage, scoring=None):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    models = Models(
        policy=policy,
        reference=None,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        uses_lora=False,
        scoring=scoring,
    )
    advantages, _ = group_advantages(batch.rewards, G)
    active = advantages != 0 if skip_zero_advantage else torch.ones(len(advantages), dtype=torch.bool)
    micro = plan_micro_batches(batch, active, G, token_budget)
    lengths = [c.shape[0] for c in batch.completion_ids]
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = optimize(
        models,
        micro,
        advantages,
        cfg,
        num_sequences=len(lengths),
        num_tokens=sum(lengths),
        params=list(policy.parameters()),
        optimizer=optimizer,
        scheduler=scheduler,
    )
    return (
        stats["loss"],
        {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None},
        len(micro),
    )


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_and_zero_advantage_skipping_keep_the_gradient(tiny_model_dir, loss_type):
    # group 0 has all-equal rewards, group 2 has a completion whose advantage is exactly zero
    batch = _batch([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 2.0, 1.0])
    cfg = GRPOConfig(group_size=G, beta=0.0, loss_type=loss_type, max_grad_norm=None, max_completion_length=6)
    loss, grads, count = _gradients(
        tiny_model_dir, batch, cfg, token_budget=10_000, skip_zero_advantage=False
    )
    loss_s, grads_s, count_s = _gradients(
        tiny_model_dir, batch, cfg, token_budget=20, skip_zero_advantage=True
    )
    assert count == 1 and count_s > 1
    assert loss == pytest.approx(loss_s, abs=1e-6)
    assert grads.keys() == grads_s.keys() and grads
    for name in grads:
        assert_close(grads[name], grads_s[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_lean_scoring_gives_the_plain_forwards_step(arch, tiny_model_dir, tiny_qwen_dir):
    """The whole GRPO step (num_iterations = 2 reuses the batch through the old-policy pass) with
    the prompt once per group equals the one with the model's own forward per completion."""
    batch = _batch([1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 2.0, 1.0])
    cfg = GRPOConfig(
        group_size=G,
        beta=0.0,
        loss_type="dapo",
        max_grad_norm=None,
        max_completion_length=6,
        num_iterations=2,
    )
    path = tiny_model_dir if arch == "llama" else tiny_qwen_dir
    loss, grads, _ = _gradients(
        path, batch, cfg, token_budget=10_000, skip_zero_advantage=False, scoring=Scoring()
    )
    loss_p, grads_p, _ = _gradients(
        path, batch, cfg, token_budget=10_000, skip_zero_advantage=False, scoring=PLAIN
    )
    assert loss == pytest.approx(loss_p, abs=1e-6)
    assert grads.keys() == grads_p.keys() and grads
    for name in grads:
        assert_close(grads[name], grads_p[name], atol=1e-6, rtol=1e-4, msg=name)
