"""The chunked LM head and ``token_logprobs`` (the prompt once per group) equal the plain
computation, values and gradients."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from trainer.batch import group_cost
from trainer.logprobs import (
    PLAIN,
    Group,
    LogitTransform,
    Scoring,
    _runs,
    selected_logprobs,
    shares_prompt,
    token_logprobs,
)


def test_chunked_logprobs_equal_log_softmax_gather_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    head = torch.nn.Linear(16, 30, bias=False)
    targets = torch.randint(0, 30, (10,))
    upstream = torch.randn(10)
    logps, entropy = selected_logprobs(hidden, head, targets, temperature=0.7, chunk_size=3)
    (logps * upstream).sum().backward()

    hidden2 = hidden.detach().clone().requires_grad_()
    weight2 = head.weight.detach().clone().requires_grad_()
    log_probs = torch.log_softmax(hidden2 @ weight2.T / 0.7, dim=-1)
    plain = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    (plain * upstream).sum().backward()

    assert_close(logps, plain)
    assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1))
    assert_close(hidden.grad, hidden2.grad)
    assert_close(head.weight.grad, weight2.grad)

    hidden.grad = (
        None  # without the entropy (reference and old-policy passes): the same log-probs and gradients
    )
    alone, none = selected_logprobs(hidden, head, targets, temperature=0.7, chunk_size=3, with_entropy=False)
    (alone * upstream).sum().backward()
    assert none is None
    assert_close(alone, plain)
    assert_close(hidden.grad, hidden2.grad)


def test_chunked_logprobs_apply_the_logit_transform_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 30, bias=False)
    targets = torch.randint(0, 30, (9,))
    upstream = torch.randn(9)
    transform = LogitTransform(scale=3.0, softcap=2.0)
    logps, entropy = selected_logprobs(
        hidden, head, targets, temperature=0.7, chunk_size=4, transform=transform
    )
    (logps * upstream).sum().backward()

    hidden2 = hidden.detach().clone().requires_grad_()
    weight2 = head.weight.detach().clone().requires_grad_()
    log_probs = torch.log_softmax(2.0 * torch.tanh(3.0 * (hidden2 @ weight2.T) / 2.0) / 0.7, dim=-1)
    plain = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    (plain * upstream).sum().backward()

    assert_close(logps, plain)
    assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1))
    assert_close(hidden.grad, hidden2.grad)
    assert_close(head.weight.grad, weight2.grad)


def _groups():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 100, (n,), generator=g) for n in (7, 4)]
    completions = [
        [torch.randint(4, 100, (n,), generator=g) for n in lengths] for lengths in ((3, 5, 1), (6, 2, 2))
    ]
    return prompts, completions


def _plain_logprobs(model, prompts, completions, temperature):
    out = []
    for prompt, group in zip(prompts, completions, strict=True):
        for completion in group:
            ids = torch.cat([prompt, completion])[None]
            logits = model(input_ids=ids).logits[0, prompt.shape[0] - 1 : -1] / temperature
            out.append(torch.log_softmax(logits.float(), -1).gather(-1, completion[:, None]).squeeze(-1))
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "scoring",
    [
        Scoring(),
        Scoring(share_prompt=False),
        Scoring(one_forward=True),
        Scoring(own_logits=True, one_forward=True),
    ],
    ids=["shared-prompt", "rows", "one-forward", "own-logits-one-forward"],
)
def test_token_logprobs_equal_one_plain_forward_per_completion(arch, scoring, tiny_model_dir, tiny_qwen_dir):
    path = tiny_model_dir if arch == "llama" else tiny_qwen_dir
    lean_model = AutoModelForCausalLM.from_pretrained(path)
    plain_model = AutoModelForCausalLM.from_pretrained(path)
    prompts, completions = _groups()
    weights = torch.linspace(-1, 1, sum(c.shape[0] for group in completions for c in group))

    nested = token_logprobs(lean_model, prompts, completions, temperature=0.9, scoring=scoring, chunk_size=4)
    logps = torch.cat([lp for group in nested for lp in group])
    (logps * weights).sum().backward()
    plain = _plain_logprobs(plain_model, prompts, completions, 0.9)
    (plain * weights).sum().backward()

    assert_close(logps, plain, atol=1e-5, rtol=1e-5)
    # the prompt, computed once per group, gets the sum of its completions' gradients
    for (name, p), p2 in zip(lean_model.named_parameters(), plain_model.parameters(), strict=True):
        assert_close(p.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("own_logits", [False, True])
def test_one_forward_scores_every_group_in_a_single_forward(own_logits, tiny_model_dir):
    """What FSDP's per-layer collectives need: one call of each decoder layer per scoring, whatever
    the groups, their lengths and the token budget."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    calls = []
    model.model.layers[0].register_forward_hook(lambda module, args, out: calls.append(1))
    prompts, completions = _groups()
    scoring = Scoring(own_logits=own_logits, one_forward=True)
    token_logprobs(model, prompts, completions, scoring=scoring, token_budget=4)
    assert len(calls) == 1
    calls.clear()
    token_logprobs(model, prompts, completions, scoring=Scoring(share_prompt=False), token_budget=4)
    assert len(calls) > 1  # the budget cuts the ordinary rows path into several forwards


@pytest.mark.parametrize(
    ("prompt_length", "lengths", "shared"),
    [(2, [400] * 4, False), (60, [8, 5, 3, 1], True)],
    ids=["short-prompt-long-completions", "long-prompt-short-completions"],
)
def test_share_where_it_pays_picks_a_path_per_group_and_equals_plain(
    prompt_length, lengths, shared, tiny_model_dir
):
    """Long completions of a short prompt score as one row each (the prompt's recomputation costs
    less than attending without the causal kernel); a long prompt with short completions is
    computed once. Either way the values and gradients are the plain forward's, and
    ``group_cost`` counts the path taken."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(4, 100, (prompt_length,), generator=g)
    completions = [torch.randint(4, 100, (n,), generator=g) for n in lengths]
    assert shares_prompt(prompt_length, lengths) is shared
    held = group_cost(Group(prompt=prompt, completions=completions))
    longest = max(lengths)
    assert held == (prompt_length + 4 * longest if shared else 4 * (prompt_length + longest))

    seen = []
    model.model.layers[0].register_forward_hook(
        lambda module, args, out: seen.append(tuple(args[0].shape[:2]))
    )
    logps = torch.cat(token_logprobs(model, [prompt], [completions], scoring=Scoring())[0])
    weights = torch.linspace(-1, 1, logps.shape[0])
    (logps * weights).sum().backward()
    plain = torch.cat(token_logprobs(plain_model, [prompt], [completions], scoring=PLAIN)[0])
    (plain * weights).sum().backward()

    # shared: the prompt alone, then the completions without their last tokens; rows: [prompt, c_i]
    assert seen[0] == ((1, prompt_length) if shared else (4, prompt_length + longest - 1))
    assert_close(logps, plain, atol=1e-4, rtol=1e-4)
    for (name, p), p2 in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        assert_close(p.grad, p2.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_groups_on_either_path_in_one_call_come_back_in_order(tiny_model_dir):
    """A call mixing groups that share their prompt and groups scored as rows returns every
    completion's log-probs in its own place, equal to the plain forward's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    shapes = [(60, [8, 5, 3]), (2, [400, 400]), (40, [6, 1])]
    prompts = [torch.randint(4, 100, (plen,), generator=g) for plen, _ in shapes]
    completions = [[torch.randint(4, 100, (n,), generator=g) for n in lengths] for _, lengths in shapes]
    assert [shares_prompt(plen, lengths) for plen, lengths in shapes] == [True, False, True]
    with torch.no_grad():
        got = token_logprobs(model, prompts, completions, scoring=Scoring())
        want = token_logprobs(model, prompts, completions, scoring=PLAIN)
    for got_group, want_group in zip(got, want, strict=True):
        for got_one, want_one in zip(got_group, want_group, strict=True):
            assert_close(got_one, want_one, atol=1e-4, rtol=1e-4)


def test_long_rows_of_unequal_lengths_go_alone():
    """A padded row loses SDPA's causal kernel (half its attention): long rows of unequal lengths
    run alone, equal ones together; short uneven rows and a shared prompt's completions (always
    under an explicit mask) still share a forward."""
    assert _runs([500, 497, 494], 8192) == [[0], [1], [2]]
    assert _runs([500, 500, 500], 8192) == [[0, 1, 2]]
    assert _runs([20, 17, 14], 8192) == [[0, 1, 2]]
    assert _runs([500, 497, 494], 8192, past=100) == [[0, 1, 2]]
