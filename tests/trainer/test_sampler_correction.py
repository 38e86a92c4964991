"""The sampler behind one interface, its log-probs, and the sampler/trainer mismatch correction."""

import copy
import json
import math

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.factories import letter_dataset, tiny_run
from trainer import loop
from trainer.batch import ScoredGroups, plan_micro_batches
from trainer.config import ConfigError, GRPOConfig
from trainer.errors import TrainingError
from trainer.generation import HFSampler, make_sampler
from trainer.logprobs import token_logprobs
from trainer.loop import optimize, train
from trainer.loss import clipped_token_loss, group_advantages, sampler_correction
from trainer.model import Models
from trainer.rollout import sample_top_p

# --- the pure function --------------------------------------------------------------------------

# two completions: tokens 0-2 and 3-4; per-token log-ratios log pi_old - log q
LOG_RATIO = torch.tensor([0.5, 1.5, -0.2, 0.6, 0.6])
SEQ = torch.tensor([0, 0, 0, 1, 1])
OLD = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.1])
SAMPLER = OLD - LOG_RATIO


def _correct(mode, cap=3.0, old=OLD, sampler=SAMPLER):
    return sampler_correction(old, sampler, SEQ, 2, mode, cap)


def test_token_truncate_caps_each_tokens_ratio():
    got = _correct("token_truncate")
    ratio = LOG_RATIO.exp()  # e^1.5 = 4.48 is the one above the cap
    assert_close(got.ratio, ratio)
    assert_close(got.weights, torch.tensor([ratio[0], 3.0, ratio[2], ratio[3], ratio[4]]))
    assert got.cut.tolist() == [False, True, False, False, False]


def test_token_mask_zeroes_only_the_tokens_above_the_cap():
    got = _correct("token_mask", cap=1.7)  # e^0.6 = 1.82 and e^1.5 are above it, e^0.5 = 1.65 is not
    ratio = LOG_RATIO.exp()
    assert_close(got.weights, torch.tensor([ratio[0], 0.0, ratio[2], 0.0, 0.0]))
    assert got.cut.tolist() == [False, True, False, True, True]


def test_sequence_modes_use_the_exp_of_the_summed_log_ratio():
    # completion 0: 0.5 + 1.5 - 0.2 = 1.8 -> e^1.8 = 6.05; completion 1: 1.2 -> e^1.2 = 3.32
    truncate = _correct("sequence_truncate", cap=4.0)
    first, second = math.exp(1.8), math.exp(1.2)
    assert_close(truncate.ratio, torch.tensor([first] * 3 + [second] * 2))
    assert_close(truncate.weights, torch.tensor([4.0] * 3 + [second] * 2))
    mask = _correct("sequence_mask", cap=4.0)
    assert_close(mask.weights, torch.tensor([0.0] * 3 + [second] * 2))
    assert mask.cut.tolist() == [True] * 3 + [False] * 2


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_a_sampler_that_is_the_policy_gets_weight_one(mode):
    got = _correct(mode, old=OLD, sampler=OLD.clone())
    assert_close(got.weights, torch.ones(5))
    assert not got.cut.any()


def test_no_correction_gives_no_weights_but_still_the_ratio():
    got = _correct(None)
    assert got.weights is None
    assert_close(got.ratio, LOG_RATIO.exp())
    with pytest.raises(ValueError, match="unknown sampler_correction"):
        _correct("token_clip")


def test_the_weight_multiplies_the_policy_term_not_the_kl():
    logps = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.2, -1.5, -0.5])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    weights = torch.tensor([2.0, 0.0, 0.5])
    common = dict(epsilon=0.2, epsilon_high=0.2, beta=0.1, ref_logps=ref)
    plain = clipped_token_loss(logps, logps, advantages, torch.zeros(3, dtype=torch.long), 1, **common)
    weighted = clipped_token_loss(
        logps, logps, advantages, torch.zeros(3, dtype=torch.long), 1, sampler_weights=weights, **common
    )
    policy_term = plain.loss - 0.1 * plain.kl  # ratio 1: -A
    assert_close(policy_term, -advantages)
    assert_close(weighted.loss, weights * policy_term + 0.1 * plain.kl)


# --- configuration and the backend choice -------------------------------------------------------


def test_defaults_are_trls_and_bad_values_name_the_field():
    config = GRPOConfig()
    assert (config.generation, config.sampler_correction, config.sampler_correction_cap) == (
        "hf",
        "sequence_mask",
        3.0,
    )
    assert GRPOConfig(sampler_correction=None).sampler_correction is None
    for values, param, words in (
        ({"generation": "vlm"}, "hyperparameters.generation", "did you mean 'vllm'"),
        ({"sampler_correction": "token_truncat"}, "hyperparameters.sampler_correction", "or null"),
        ({"sampler_correction_cap": 0.5}, "hyperparameters.sampler_correction_cap", ">= 1.0"),
        ({"sampler_correction_cap": float("nan")}, "hyperparameters.sampler_correction_cap", "finite"),
    ):
        with pytest.raises(ConfigError) as caught:
            GRPOConfig.from_dict(values)
        assert caught.value.param == param and words in str(caught.value)


def test_make_sampler_gives_the_hf_sampler_and_a_missing_vllm_environment_says_how_to_build_it(
    monkeypatch, tmp_path
):
    model = torch.nn.Linear(2, 2)
    sampler = make_sampler(GRPOConfig(), model)
    assert isinstance(sampler, HFSampler) and sampler.model is model
    monkeypatch.setenv("GRPO_VLLM_PYTHON", str(tmp_path / "no-such-env" / "bin" / "python"))
    with pytest.raises(TrainingError, match="make vllm-setup"):
        make_sampler(GRPOConfig(generation="vllm"), model, model_dir=tmp_path)


# --- the HF sampler's log-probs -----------------------------------------------------------------


def test_sampling_with_log_probs_draws_the_same_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * 3
    uniforms = torch.rand(64, generator=g)
    for top_p in (1.0, 0.8):
        plain = sample_top_p(logits / 0.7, top_p, None, uniforms)
        tokens, logps = sample_top_p(logits / 0.7, top_p, None, uniforms, with_logprobs=True)
        assert torch.equal(tokens, plain)
        expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, plain[:, None]).squeeze(-1)
        assert_close(logps, expected, atol=1e-5, rtol=0)  # before top-p: the full distribution's
    drawn = sample_top_p(logits, 1.0, torch.Generator().manual_seed(3))
    again, _ = sample_top_p(logits, 1.0, torch.Generator().manual_seed(3), with_logprobs=True)
    assert torch.equal(drawn, again)  # the generator's draws are the same too


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_hf_sampler_log_probs_are_the_trainers(tiny_model_dir, temperature, top_p):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("What is 1 + 2?", "Hi", "abc def")]
    rollout = HFSampler(model).generate(
        prompts,
        group_size=3,
        max_new_tokens=10,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.sampler_logprobs is not None
    grouped = [rollout.completion_ids[b * 3 : b * 3 + 3] for b in range(3)]
    with torch.no_grad():
        scored = token_logprobs(model, prompts, grouped, temperature=temperature)
    trainer = [t for group in scored for t in group]
    assert sum(t.numel() for t in trainer) > 9
    for sampled, expected, ids in zip(rollout.sampler_logprobs, trainer, rollout.completion_ids, strict=True):
        assert sampled.dtype == torch.float32 and sampled.shape == ids.shape
        assert_close(sampled, expected, atol=1e-4, rtol=0)


def test_greedy_decoding_gives_no_sampler_log_probs(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rollout = HFSampler(model).generate(
        [torch.tensor([1, 5, 7])],
        group_size=2,
        max_new_tokens=4,
        eos_token_ids=[2],
        pad_id=0,
        temperature=0.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.sampler_logprobs is None


# --- in a training step -------------------------------------------------------------------------


def _batch_with_sampler_logps(model_dir, shift):
    """Three groups of G = 4 whose sampler log-probs are the policy's own minus ``shift``."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (n,), generator=g) for n in (6, 3, 5)]
    completions = [
        torch.randint(4, 100, (int(n),), generator=g) for n in torch.randint(1, 7, (12,), generator=g)
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        scored = token_logprobs(model, prompts, [completions[b * 4 : b * 4 + 4] for b in range(3)])
    return ScoredGroups(
        row_indices=[0, 1, 2],
        prompt_ids=prompts,
        completion_ids=completions,
        prompts=[""] * 3,
        completions=[""] * 12,
        truncated=torch.zeros(12, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 1.0, 0.3, 0.9, 0.1, 0.0, 0.4]),
        parts={},
        errors={},
        error_messages=[],
        sampler_logprobs=[t - shift for group in scored for t in group],
    )


def _step(model_dir, batch, cfg, advantages=None):
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    models = Models(policy=policy, reference=None, tokenizer=None, uses_lora=False)
    if advantages is None:
        advantages, _ = group_advantages(batch.rewards, 4)
    micro = plan_micro_batches(batch, torch.ones(12, dtype=torch.bool), 4, 20)  # several micro-batches
    lengths = [c.shape[0] for c in batch.completion_ids]
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    stats = optimize(
        models,
        micro,
        advantages,
        cfg,
        num_sequences=12,
        num_tokens=sum(lengths),
        params=list(policy.parameters()),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
    )
    assert len(micro) > 1 and all(m.sampler_logps is not None for m in micro)
    return stats, {n: p.grad.clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_a_token_weight_scales_the_gradient_and_shows_in_the_metrics(tiny_model_dir, num_iterations):
    """Sampler log-probs uniformly 0.4 below the trainer's: every token weighs e^0.4 under
    token_truncate (cap 3), so the step's gradient is e^0.4 times the uncorrected one."""
    base = dict(
        group_size=4, beta=0.0, max_grad_norm=None, max_completion_length=6, num_iterations=num_iterations
    )
    batch = _batch_with_sampler_logps(tiny_model_dir, shift=0.4)
    stats, grads = _step(tiny_model_dir, batch, GRPOConfig(sampler_correction="token_truncate", **base))
    plain_stats, plain = _step(tiny_model_dir, batch, GRPOConfig(sampler_correction=None, **base))
    for name in grads:
        assert_close(grads[name], plain[name] * math.exp(0.4), atol=1e-6, rtol=1e-4, msg=name)
    for figures in (stats, plain_stats):  # reported whether or not the correction is applied
        assert figures["sampler/ratio_mean"] == pytest.approx(math.exp(0.4), abs=1e-4)
        assert figures["sampler/ratio_max"] == pytest.approx(math.exp(0.4), abs=1e-4)
        assert figures["sampler/logprob_diff_mean_abs"] == pytest.approx(0.4, abs=1e-4)
        assert figures["sampler/clipped_fraction"] == 0.0


def test_the_policy_modules_own_samples_are_not_reweighted(tiny_model_dir):
    """The HF sampler draws from the policy module itself: its log-probs differ from the trainer's
    by rounding alone (in bfloat16 ~1e-2 a token, enough for sequence weights of 0.5-2 over long
    completions), which the correction would turn into noise on the gradient. Not applied, as TRL
    applies it to vLLM alone; the sampler/* figures still say how far apart the two are."""
    base = dict(group_size=4, beta=0.0, max_grad_norm=None, max_completion_length=6)
    batch = _batch_with_sampler_logps(tiny_model_dir, shift=0.4)
    assert not batch.sampler_is_policy
    corrected_stats, corrected = _step(
        tiny_model_dir, batch, GRPOConfig(sampler_correction="token_truncate", **base)
    )
    batch.sampler_is_policy = True
    stats, grads = _step(tiny_model_dir, batch, GRPOConfig(sampler_correction="token_truncate", **base))
    _, plain = _step(tiny_model_dir, batch, GRPOConfig(sampler_correction=None, **base))
    for name in grads:
        assert torch.equal(grads[name], plain[name]), name
    assert any(not torch.allclose(corrected[n], plain[n], atol=1e-6) for n in grads)
    assert stats["sampler/ratio_mean"] == pytest.approx(math.exp(0.4), abs=1e-4)
    assert stats["sampler/logprob_diff_mean_abs"] == pytest.approx(0.4, abs=1e-4)


def test_the_hf_sampler_says_it_is_the_policy(tiny_model_dir):
    from trainer.generation import HFSampler

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rollout = HFSampler(model).generate(
        [torch.tensor([5, 6, 7])],
        group_size=2,
        max_new_tokens=3,
        eos_token_ids=[2],
        pad_id=0,
        temperature=1.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.from_policy and rollout.sampler_logprobs is not None


def test_a_masked_sequence_takes_no_part_in_the_gradient(tiny_model_dir):
    """sequence_mask: completion 0's sampler log-probs are 2 below the trainer's on every token, so
    its ratio e^(2 L) is above the cap and it drops out: the gradient is the one where its
    advantage is 0, the others' unchanged."""
    cfg = GRPOConfig(group_size=4, beta=0.0, max_grad_norm=None, max_completion_length=6)
    assert cfg.sampler_correction == "sequence_mask"
    batch = _batch_with_sampler_logps(tiny_model_dir, shift=0.0)
    advantages, _ = group_advantages(batch.rewards, 4)
    assert advantages[0] != 0
    without = advantages.clone()
    without[0] = 0.0
    _, expected = _step(tiny_model_dir, batch, cfg, without)
    batch.sampler_logprobs[0] = batch.sampler_logprobs[0] - 2.0
    stats, grads = _step(tiny_model_dir, batch, cfg, advantages)
    lengths = torch.tensor([c.shape[0] for c in batch.completion_ids])
    assert stats["sampler/clipped_fraction"] == pytest.approx(lengths[0].item() / lengths.sum().item())
    assert stats["sampler/ratio_max"] == pytest.approx(math.exp(2.0 * lengths[0].item()), rel=1e-4)
    for name in grads:
        assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
    _, unmasked = _step(tiny_model_dir, batch, GRPOConfig(**{**cfg.to_dict(), "sampler_correction": None}))
    assert any(not torch.allclose(unmasked[n], expected[n], atol=1e-6) for n in grads)


# --- a whole run --------------------------------------------------------------------------------


class Bfloat16Sampler:
    """Samples from a bf16 copy of the policy, refreshed by ``sync``: a sampler that differs from
    the trainer as a vLLM engine in another precision does."""

    def __init__(self, model):
        self.copy = copy.deepcopy(model).to(torch.bfloat16)
        self.inner = HFSampler(self.copy)
        self.synced_from, self.syncs, self.closed = None, 0, False

    def generate(self, prompt_ids, **kwargs):
        rollout = self.inner.generate(prompt_ids, **kwargs)
        rollout.from_policy = False  # a copy in another precision, not the policy module
        return rollout

    def sync(self, model):
        with torch.no_grad():
            for mine, theirs in zip(self.copy.parameters(), model.parameters(), strict=True):
                mine.copy_(theirs)
        self.synced_from, self.syncs = model, self.syncs + 1

    def close(self):
        self.closed = True


def _metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_the_fp32_hf_sampler_matches_the_trainer_and_a_bf16_one_does_not(
    tiny_model_dir, tmp_path, monkeypatch
):
    data = letter_dataset(tmp_path / "data.jsonl")
    # a reward that tells every completion apart: every step scores tokens
    run = tiny_run(
        tiny_model_dir, data, [{"type": "length", "target": 30}], max_steps=2, max_completion_length=12
    )
    train(run, tmp_path / "fp32")
    for m in _metrics(tmp_path / "fp32"):
        # measured: |log-prob difference| ~1e-7, the ratio 1 +- 1e-6
        assert m["sampler/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert m["sampler/ratio_max"] < 1.0001 and m["sampler/ratio_min"] > 0.9999
        assert m["sampler/logprob_diff_mean_abs"] < 1e-5 and m["sampler/clipped_fraction"] == 0.0

    made = []

    def bf16_sampler(config, model, **options):
        made.append(Bfloat16Sampler(model))
        return made[-1]

    monkeypatch.setattr(loop, "make_sampler", bf16_sampler)
    train(run, tmp_path / "bf16")
    (sampler,) = made
    for m in _metrics(tmp_path / "bf16"):
        # measured: |log-prob difference| ~7e-4 (the tiny model's logits are small, so bf16's
        # rounding moves them little), completions' ratios 0.995 to 1.003
        assert m["sampler/logprob_diff_mean_abs"] > 1e-4
        assert max(m["sampler/ratio_max"] - 1.0, 1.0 - m["sampler/ratio_min"]) > 1e-3
    # synced after each optimizer step, from the policy itself, and closed at the end
    assert sampler.syncs == 2 and sampler.closed
    for name, weight in sampler.synced_from.named_parameters():
        assert torch.equal(dict(sampler.copy.named_parameters())[name], weight.detach().to(torch.bfloat16))


def test_a_vllm_engine_beside_the_trainer_asks_only_for_memory_that_is_free():
    """vLLM refuses to start unless gpu_memory_utilization x the device's memory is free (0.9 by
    default); beside a trainer holding a 3B model (12 GB of 80) it is not. The engine is given a
    share that passes, from the memory free; none on a CPU."""
    from trainer.generation.vllm import startup_memory_args, startup_utilization

    gib = 1 << 30
    assert startup_utilization(68 * gib, 80 * gib) * 80 * gib <= 68 * gib  # passes vLLM's check
    assert startup_utilization(68 * gib, 80 * gib) == pytest.approx(0.8075)
    assert startup_utilization(80 * gib, 80 * gib) == 0.9  # a free device: vLLM's own default
    assert startup_utilization(0, 80 * gib) == 0.01
    assert startup_memory_args(torch.nn.Linear(2, 2)) == []
