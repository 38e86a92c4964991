"""A training step on a device that is not the CPU: every tensor the loss meets must be on the
policy's device. The batch is planned on the CPU (rewards, advantages, token-to-completion index),
which CPU runs never notice; a CUDA run failed at its first step. No GPU here: the policy sits on
PyTorch's ``meta`` device, which computes shapes and refuses any tensor of another device, so the
step runs its forwards, loss and backward until its first read of a value (``.item()``), which a
meta tensor cannot give. Reaching that read is the test; a device mismatch fails before it."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.batch import ScoredGroups, plan_micro_batches
from trainer.config import GRPOConfig
from trainer.loop import optimize
from trainer.loss import group_advantages
from trainer.model import NO_HUB_KERNELS, Models

G = 4


def _batch(with_sampler_logprobs: bool) -> ScoredGroups:
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 60, (n,), generator=generator) for n in (6, 3)]
    lengths = torch.randint(2, 7, (2 * G,), generator=generator)
    completions = [torch.randint(4, 60, (int(n),), generator=generator) for n in lengths]
    return ScoredGroups(
        row_indices=[0, 1],
        prompt_ids=prompts,
        completion_ids=completions,
        prompts=["", ""],
        completions=[""] * (2 * G),
        truncated=torch.zeros(2 * G, dtype=torch.bool),
        rewards=torch.tensor([0.0, 1, 0, 1, 1, 0, 0, 0]),
        parts={},
        errors={},
        error_messages=[],
        sampler_logprobs=[torch.zeros(c.shape[0]) for c in completions] if with_sampler_logprobs else None,
    )


@pytest.mark.parametrize(
    "settings, sampler_logprobs, reads_first",
    [
        (dict(loss_type="dapo", beta=0.0), False, "loss.item()"),
        (dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence"), False, "loss.item()"),
        (dict(loss_type="dr_grpo", beta=0.0, sampler_correction="sequence_mask"), True, "ratio.sum().item()"),
    ],
)
def test_a_training_step_computes_on_the_policys_device(
    tiny_model_dir, settings, sampler_logprobs, reads_first
):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **NO_HUB_KERNELS).to_empty(device="meta")
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if settings["beta"] else None
    models = Models(policy, reference, AutoTokenizer.from_pretrained(tiny_model_dir), uses_lora=False)
    batch = _batch(sampler_logprobs)
    advantages, _ = group_advantages(batch.rewards, G)
    micro_batches = plan_micro_batches(batch, torch.ones(2 * G, dtype=torch.bool), G, 8192)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors") as caught:
        optimize(
            models,
            micro_batches,
            advantages,
            GRPOConfig(group_size=G, **settings),
            num_sequences=2 * G,
            num_tokens=sum(c.shape[0] for c in batch.completion_ids),
            params=list(policy.parameters()),
            optimizer=optimizer,
            scheduler=scheduler,
        )
    # where the step first read a value: past the loss and its backward (or, with a sampler's
    # log-probs, past the correction, whose figures are read before the loss)
    statements = [str(entry.statement) for entry in caught.traceback]
    assert any(reads_first in statement for statement in statements), statements


def test_the_models_keep_their_own_layers(tiny_model_dir):
    """transformers would swap layers for kernels fetched from the Hub on a CUDA model's first
    train/eval switch (code downloaded at run time; a failure where the Hub is out of reach)."""
    from trainer.model import load_models

    models = load_models(tiny_model_dir, GRPOConfig(beta=0.04), torch.device("cpu"))
    assert not models.policy.use_kernels and not models.reference.use_kernels
