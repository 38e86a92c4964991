"""Batched generation with one prefill per prompt matches Hugging Face's generate."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.rollout import generate, sample_top_p


def test_greedy_rollout_matches_hf_generate_per_prompt(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("What is 1 + 2?", "Hi", "abc def ghi jkl")]
    rollout = generate(model, prompts, group_size=3, max_new_tokens=12, eos_token_ids=[tokenizer.eos_token_id],
                       pad_id=tokenizer.pad_token_id, temperature=1e-5, top_p=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert len(rollout.completion_ids) == 9
    for b, prompt in enumerate(prompts):
        expected = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                                  max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[0]:]
        if (expected == tokenizer.eos_token_id).any():
            expected = expected[: int((expected == tokenizer.eos_token_id).int().argmax()) + 1]
        for g in range(3):
            assert rollout.completion_ids[b * 3 + g].tolist() == expected.tolist()
            assert bool(rollout.truncated[b * 3 + g]) == (expected[-1].item() != tokenizer.eos_token_id)


def test_sampling_stops_at_eos_and_flags_truncation(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # a uniform next-token distribution: EOS comes with p = 1/101 per token
        model.lm_head.weight.zero_()
    prompts = [torch.tensor(tokenizer("x" * n)["input_ids"]) for n in (1, 5)]
    rollout = generate(model, prompts, group_size=8, max_new_tokens=40, eos_token_ids=[eos], pad_id=0,
                       temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(3))
    for completion, truncated in zip(rollout.completion_ids, rollout.truncated, strict=True):
        eos_positions = (completion == eos).nonzero().flatten().tolist()
        if truncated:
            assert len(completion) == 40 and not eos_positions
        else:
            assert eos_positions == [len(completion) - 1]  # nothing after EOS
    # about a third of the completions stop within 40 tokens
    assert 0 < int(rollout.truncated.sum()) < 16


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    tokens = sample_top_p(torch.log(probs).repeat(20000, 1), 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).float() / 20000
    assert counts[1] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    tokens = sample_top_p(logits, 0.7, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}


def test_non_finite_logits_are_refused_not_sampled():
    import pytest

    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        sample_top_p(logits, 1.0, torch.Generator().manual_seed(0))
