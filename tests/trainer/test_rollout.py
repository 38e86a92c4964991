"""Batched generation with one prefill per prompt matches Hugging Face's generate."""

from collections import Counter

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from trainer import rollout
from trainer.rollout import generate, sample_top_p


def test_greedy_rollout_matches_hf_generate_per_prompt(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("What is 1 + 2?", "Hi", "abc def ghi jkl")]
    rollout = generate(
        model,
        prompts,
        group_size=3,
        max_new_tokens=12,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        temperature=1e-5,
        top_p=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(rollout.completion_ids) == 9
    for b, prompt in enumerate(prompts):
        expected = model.generate(
            prompt[None],
            attention_mask=torch.ones_like(prompt)[None],
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, prompt.shape[0] :]
        if (expected == tokenizer.eos_token_id).any():
            expected = expected[: int((expected == tokenizer.eos_token_id).int().argmax()) + 1]
        for g in range(3):
            assert rollout.completion_ids[b * 3 + g].tolist() == expected.tolist()
            assert bool(rollout.truncated[b * 3 + g]) == (expected[-1].item() != tokenizer.eos_token_id)


def test_dropping_finished_rows_from_the_batch_changes_no_completion(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    prompts = [
        torch.tensor(tokenizer(t)["input_ids"]) for t in ("1 + 2", "Hi", "abc", "what?", "x y z", "42", "ok")
    ]
    kwargs = dict(
        group_size=2,
        max_new_tokens=16,
        eos_token_ids=[eos],
        pad_id=tokenizer.pad_token_id,
        temperature=1e-5,
        top_p=1.0,
    )  # greedy: no random draws to differ
    plain = generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    common = Counter(t for c in plain.completion_ids for t in c.tolist()).most_common(1)[0][0]
    with torch.no_grad():  # EOS where the commonest token was likely: completions end at different steps
        model.lm_head.weight[eos] = model.lm_head.weight[common] * 1.5
        for layer in model.model.layers:  # sharp attention, so that positions and masks change the output
            layer.self_attn.q_proj.weight *= 30
            layer.self_attn.k_proj.weight *= 30

    selected = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache,
        "batch_select_indices",
        lambda cache, indices: (selected.append(len(indices)), select(cache, indices)),
    )
    pruned = generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    monkeypatch.setattr(rollout, "PRUNE_WHEN_FINISHED", 10**9)  # never drop a row
    kept = generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)

    lengths = sorted({len(c) for c in kept.completion_ids})
    assert len(lengths) >= 3 and lengths[0] < 16 and selected  # rows did finish early and were dropped
    assert [c.tolist() for c in pruned.completion_ids] == [c.tolist() for c in kept.completion_ids]
    assert pruned.truncated.tolist() == kept.truncated.tolist()


def test_sampling_stops_at_eos_and_flags_truncation(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # a uniform next-token distribution: EOS comes with p = 1/101 per token
        model.lm_head.weight.zero_()
    prompts = [torch.tensor(tokenizer("x" * n)["input_ids"]) for n in (1, 5)]
    rollout = generate(
        model,
        prompts,
        group_size=8,
        max_new_tokens=40,
        eos_token_ids=[eos],
        pad_id=0,
        temperature=1.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(3),
    )
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


def _model_with_varied_eos(tiny_model_dir):
    """The tiny model with EOS made likely, so that sampled completions end at different steps."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = (
            model.lm_head.weight.mean(0) + 0.02 * model.lm_head.weight[5]
        )
        model.lm_head.weight *= 3
    return model, tokenizer


def test_sampled_tokens_do_not_depend_on_dropping_finished_rows(tiny_model_dir, monkeypatch):
    model, tokenizer = _model_with_varied_eos(tiny_model_dir)
    prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("1 + 2", "Hi", "abc", "what?")]
    kwargs = dict(
        group_size=4,
        max_new_tokens=40,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
        top_p=0.95,
    )  # sampled: random draws every step

    selected = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache,
        "batch_select_indices",
        lambda cache, indices: (selected.append(len(indices)), select(cache, indices)),
    )
    pruned = generate(model, prompts, generator=torch.Generator().manual_seed(7), **kwargs)
    monkeypatch.setattr(rollout, "PRUNE_WHEN_FINISHED", 10**9)  # never drop a row
    kept = generate(model, prompts, generator=torch.Generator().manual_seed(7), **kwargs)

    lengths = sorted(len(c) for c in kept.completion_ids)
    assert (
        lengths[0] < 40 and len(set(lengths)) >= 4 and len(selected) >= 2
    )  # rows finished early and were dropped
    assert [c.tolist() for c in pruned.completion_ids] == [c.tolist() for c in kept.completion_ids]
    assert pruned.truncated.tolist() == kept.truncated.tolist()


def test_growing_cache_samples_what_the_plain_dynamic_cache_samples(tiny_model_dir, monkeypatch):
    model, tokenizer = _model_with_varied_eos(tiny_model_dir)
    prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("1 + 2", "Hi there, how are you", "abc")]
    kwargs = dict(
        group_size=3,
        max_new_tokens=300,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
        top_p=1.0,
    )
    moves = []
    move = rollout.GrowingLayer._move_into
    monkeypatch.setattr(
        rollout.GrowingLayer,
        "_move_into",
        lambda layer, k, v, room: (moves.append(k.shape[-2]), move(layer, k, v, room)),
    )
    growing = generate(model, prompts, generator=torch.Generator().manual_seed(1), **kwargs)
    monkeypatch.setattr(rollout, "new_cache", lambda model, _: DynamicCache(config=model.config))
    plain = generate(model, prompts, generator=torch.Generator().manual_seed(1), **kwargs)

    assert max(len(c) for c in plain.completion_ids) > 100  # long enough for the buffer to grow
    assert [c.tolist() for c in growing.completion_ids] == [c.tolist() for c in plain.completion_ids]
    layers = model.config.num_hidden_layers
    assert max(moves) > 50 and len(moves) < 10 * layers  # it grew a few times a layer, not once a token


def test_growing_layer_holds_what_concatenation_holds():
    from transformers.cache_utils import DynamicLayer

    generator = torch.Generator().manual_seed(0)
    growing, plain = rollout.GrowingLayer(max_length=40), DynamicLayer()

    def step(rows: int, n: int) -> None:
        k, v = (torch.randn(rows, 3, n, 4, generator=generator) for _ in range(2))
        got, want = growing.update(k, v), plain.update(k, v)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)

    step(2, 5)  # prefill
    for layer in (growing, plain):
        layer.batch_repeat_interleave(3)  # [2] rows -> [6]
    for _ in range(20):
        step(6, 1)
    for layer in (growing, plain):
        layer.batch_select_indices(torch.tensor([0, 4, 5]))
    step(3, 2)
    for layer in (growing, plain):
        layer.crop(-3)
    for _ in range(16):  # past max_length's first guess: grows again
        step(3, 1)
    assert growing.get_seq_length() == plain.get_seq_length() == 5 + 20 + 2 - 3 + 16
    assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
