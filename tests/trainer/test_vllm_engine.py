"""The vLLM sampler against the Hugging Face path, on one real vLLM engine (CPU build, fp32).

The engine runs in vLLM's own environment (``make vllm-setup`` builds .venv-vllm); without it the
engine tests are skipped. One engine serves the module: it starts on a tiny random Llama and
follows the reference model ``ref.model`` through every sync, so each test can compare against it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.factories import letter_dataset, tiny_run
from trainer.config import GRPOConfig
from trainer.errors import OutOfMemoryError
from trainer.generation.vllm import VLLMEngineError, VLLMSampler, vllm_python
from trainer.logprobs import token_logprobs
from trainer.loop import train
from trainer.loss import sampler_correction
from trainer.progress import Progress
from trainer.rollout import generate
from trainer.tiny import make_tiny_model

try:
    vllm_python()
    NO_ENGINE = ""
except VLLMEngineError as exc:
    NO_ENGINE = f"no vLLM environment ({exc})"
needs_engine = pytest.mark.skipif(bool(NO_ENGINE), reason=NO_ENGINE or "-")

MAX_NEW = 12
CONFIG = GRPOConfig(max_prompt_length=144, max_completion_length=MAX_NEW, seed=0)


class Reference:
    """The HF model the engine holds the weights of, and the prompts every test samples."""

    def __init__(self, model_dir):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.eos = [tokenizer.eos_token_id]
        self.pad = tokenizer.pad_token_id
        # the first fills a prefix-cache block (128 tokens on CPU): a cache kept over a sync is hit
        texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Say a number:", "Q: 2+2=? A:" * 5]
        self.prompts = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def greedy_hf(model, ref: Reference, eos: list[int]) -> list[list[int]]:
    rollout = generate(
        model,
        ref.prompts,
        group_size=1,
        max_new_tokens=MAX_NEW,
        eos_token_ids=eos,
        pad_id=ref.pad,
        temperature=0.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    return [c.tolist() for c in rollout.completion_ids]


def greedy_vllm(sampler: VLLMSampler, ref: Reference, eos: list[int], group_size: int = 1):
    rollout = sampler.generate(
        ref.prompts,
        group_size=group_size,
        max_new_tokens=MAX_NEW,
        eos_token_ids=eos,
        pad_id=ref.pad,
        temperature=0.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    return rollout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention has no kernel for trainer.tiny's default 16
    return make_tiny_model(tmp_path_factory.mktemp("vllm-llama"), num_heads=2)


@pytest.fixture(scope="module")
def ref(model_dir):
    return Reference(model_dir)


@pytest.fixture(scope="module")
def sampler(ref, model_dir):
    if NO_ENGINE:
        pytest.skip(NO_ENGINE)
    # LoRA slots too, so that test_lora_adapter can share this engine through its URL; and so no
    # sleep where the platform has it (a sleeping engine would refuse its other client)
    sampler = VLLMSampler(CONFIG, ref.model, threads=1, max_lora_rank=8, sleep=False)
    yield sampler
    sampler.close()


@needs_engine
def test_greedy_tokens_equal_hf_stopping_at_eos_included(sampler, ref):
    free = greedy_hf(ref.model, ref, ref.eos)
    # a token the first completion writes early made an EOS: that completion must stop at its
    # first occurrence, EOS included and not truncated; those that never write it run to the length
    stop = free[0][3]
    eos = [*ref.eos, stop]
    expected = greedy_hf(ref.model, ref, eos)
    assert expected[0] == free[0][: free[0].index(stop) + 1]

    rollout = greedy_vllm(sampler, ref, eos, group_size=2)
    got = [c.tolist() for c in rollout.completion_ids]
    assert got == [c for c in expected for _ in range(2)]  # G = 2: the same greedy twice, adjacent
    assert rollout.truncated.tolist() == [stop not in c for c in expected for _ in range(2)]
    assert rollout.sampler_logprobs is None  # greedy: no sampling distribution


@needs_engine
def test_sampled_logprobs_equal_the_trainers_and_seeds_reproduce(sampler, ref):
    def sample(seed: int):
        return sampler.generate(
            ref.prompts,
            group_size=3,
            max_new_tokens=MAX_NEW,
            eos_token_ids=ref.eos,
            pad_id=ref.pad,
            temperature=0.7,
            top_p=0.9,  # the log-probs are taken before top-p, as the trainer's are
            generator=torch.Generator().manual_seed(seed),
        )

    rollout = sample(1)
    assert len(rollout.completion_ids) == 3 * len(ref.prompts)
    groups = [rollout.completion_ids[3 * b : 3 * b + 3] for b in range(len(ref.prompts))]
    with torch.no_grad():
        trainer = token_logprobs(ref.model, ref.prompts, groups, temperature=0.7)
    for got, want in zip(rollout.sampler_logprobs, [lp for group in trainer for lp in group], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

    again, other = sample(1), sample(2)
    assert [c.tolist() for c in again.completion_ids] == [c.tolist() for c in rollout.completion_ids]
    assert [c.tolist() for c in other.completion_ids] != [c.tolist() for c in rollout.completion_ids]


@needs_engine
def test_full_weight_sync_serves_the_new_weights(sampler, ref):
    before = greedy_hf(ref.model, ref, ref.eos)
    assert [c.tolist() for c in greedy_vllm(sampler, ref, ref.eos).completion_ids] == before
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in ref.model.parameters():
            parameter.add_(0.1 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    after = greedy_hf(ref.model, ref, ref.eos)
    assert after != before  # the change shows in the tokens: the comparison below can fail

    sampler.sync(ref.model)
    # the same prompts as before the sync: their cached blocks must not be reused
    assert [c.tolist() for c in greedy_vllm(sampler, ref, ref.eos).completion_ids] == after


@needs_engine
def test_lora_adapter_sync_through_the_servers_url(sampler, ref):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(
        copy.deepcopy(ref.model),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    ).eval()
    base = greedy_hf(ref.model, ref, ref.eos)
    # a second sampler on the same engine, as a remote client: adapters go up over HTTP
    client = VLLMSampler(CONFIG, policy, url=sampler.url)
    try:
        assert client.upload
        assert [
            c.tolist() for c in greedy_vllm(client, ref, ref.eos).completion_ids
        ] == base  # no adapter yet
        for scale in (1.0, 2.0):  # two syncs: the second adapter replaces the first
            with torch.no_grad():
                for name, parameter in policy.named_parameters():
                    if "lora_B" in name:
                        parameter.mul_(scale)
            expected = greedy_hf(policy, ref, ref.eos)
            assert expected != base
            client.sync(policy)
            assert [c.tolist() for c in greedy_vllm(client, ref, ref.eos).completion_ids] == expected
        # the base model's own sampler is untouched by the adapter
        assert [c.tolist() for c in greedy_vllm(sampler, ref, ref.eos).completion_ids] == base
    finally:
        client.close()


@needs_engine
def test_mismatch_is_nil_in_fp32_and_shows_when_the_sampler_runs_in_bf16(sampler, ref, tmp_path):
    """The sampler/trainer mismatch the correction exists for: the fp32 engine's log-probs are the
    fp32 trainer's, so its importance ratios are 1; a bf16 engine on the same weights samples from
    a slightly different distribution, and its ratios spread around 1 (measured on this model: max
    |diff| 3.3e-3 to 5.5e-3, ratio spread 5.9e-3 to 9.1e-3 over seeds; fp32: 5e-7 and 1e-6)."""
    ref.model.save_pretrained(tmp_path / "policy")  # the weights as they are now (other tests change them)
    bf16 = VLLMSampler(
        CONFIG, ref.model, threads=1, dtype="bfloat16", enforce_eager=True, model_dir=tmp_path / "policy"
    )
    try:
        measured = {}
        for name, engine in (("fp32", sampler), ("bf16", bf16)):
            rollout = engine.generate(
                ref.prompts,
                group_size=3,
                max_new_tokens=MAX_NEW,
                eos_token_ids=ref.eos,
                pad_id=ref.pad,
                temperature=0.7,
                top_p=1.0,
                generator=torch.Generator().manual_seed(3),
            )
            groups = [rollout.completion_ids[3 * b : 3 * b + 3] for b in range(len(ref.prompts))]
            with torch.no_grad():
                trainer = token_logprobs(ref.model, ref.prompts, groups, temperature=0.7)
            old = torch.cat([lp for group in trainer for lp in group])  # [N]
            drawn = torch.cat(rollout.sampler_logprobs)  # [N]
            seq_index = torch.cat(
                [torch.full((len(c),), i) for i, c in enumerate(rollout.completion_ids)]
            )  # [N]
            correction = sampler_correction(
                old, drawn, seq_index, len(rollout.completion_ids), "token_truncate", 3.0
            )
            measured[name] = ((old - drawn).abs().max().item(), correction)
    finally:
        bf16.close()

    fp32_diff, fp32 = measured["fp32"]
    bf16_diff, bf16_correction = measured["bf16"]
    assert fp32_diff < 1e-4
    torch.testing.assert_close(fp32.weights, torch.ones_like(fp32.weights), rtol=0, atol=1e-4)
    assert bf16_diff > 1e-3, f"bf16 sampling matched fp32 to {bf16_diff:.2e}: no mismatch to correct"
    spread = (bf16_correction.ratio.max() - bf16_correction.ratio.min()).item()
    assert spread > 2e-3, f"bf16 ratios spread only {spread:.2e}"
    assert not bf16_correction.cut.any()  # a small mismatch: truncation at 3 leaves the weights as is
    torch.testing.assert_close(bf16_correction.weights, bf16_correction.ratio)


@needs_engine
def test_without_sleep_mode_the_engine_refuses_to_sleep_and_the_sampler_never_asks(sampler, model_dir, ref):
    """vLLM's CPU build has no sleep mode. A sampler that asks for it (vllm_sleep): its server
    reports it cannot sleep, refuses /sleep and /wake_up with the reason, and the sampler never asks,
    so a step's generate -> push -> generate runs as without (the GPU path: test_vllm_sleep.py)."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # the engine's
    own = VLLMSampler(dataclasses.replace(CONFIG, vllm_sleep=True), policy, threads=1)
    try:
        assert own.engine.ready["can_sleep"] is False
        assert own.sleep_level == 0
        refusals = {
            "/sleep": "sleep: vLLM's cpu platform has no sleep mode (vLLM has it on CUDA, ROCm and XPU)",
            "/wake_up": "wake_up: vLLM's cpu platform has no sleep mode (vLLM has it on CUDA, ROCm and XPU)",
        }
        for route, reason in refusals.items():
            request = urllib.request.Request(own.url + route, data=b'{"level": 2}', method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 409
            assert json.loads(refused.value.read()) == {"error": reason}

        before = greedy_hf(policy, ref, ref.eos)
        assert [c.tolist() for c in greedy_vllm(own, ref, ref.eos).completion_ids] == before
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.mul_(1.5)
        expected = greedy_hf(policy, ref, ref.eos)
        assert expected != before  # the push shows in the tokens
        own.sync(policy)
        assert [c.tolist() for c in greedy_vllm(own, ref, ref.eos).completion_ids] == expected
        assert own.asleep == set()
        assert own.client.request("GET", "/health")["sleeping"] == []
    finally:
        own.close()

    # an engine started without --sleep-mode (this module's, shared through its URL) says so
    health = sampler.client.request("GET", "/health")
    assert health["can_sleep"] is False and health["sleeping"] == []
    with pytest.raises(VLLMEngineError, match="sleep: the server was started without --sleep-mode"):
        sampler.client.request("POST", "/sleep", {"level": 1})


@needs_engine
def test_a_kv_cache_too_small_names_the_setting(ref):
    with pytest.raises(OutOfMemoryError, match="vllm_kv_cache_gib = 1e-05 GiB"):
        VLLMSampler(CONFIG, ref.model, threads=1, kv_cache_gib=1e-5)


def test_a_missing_vllm_environment_says_how_to_build_it(ref, tmp_path):
    with pytest.raises(VLLMEngineError, match="make vllm-setup"):
        VLLMSampler(CONFIG, ref.model, python=tmp_path / "no-such-python")


@needs_engine
def test_an_engine_killed_midway_is_reported_as_out_of_memory(ref):
    sampler = VLLMSampler(CONFIG, ref.model, threads=1)
    try:
        os.kill(sampler.engine.process.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer does
        with pytest.raises(OutOfMemoryError, match="vllm_kv_cache_gib"):
            greedy_vllm(sampler, ref, ref.eos)
    finally:
        sampler.close()  # and closing a dead engine raises nothing


@needs_engine
@pytest.mark.slow
def test_a_training_run_sampling_with_vllm_learns(model_dir, tmp_path):
    """The loop with ``generation: "vllm"``: the engine samples every step from the policy synced
    after the step before, and the reward rises as on the HF path (tests/trainer/test_train.py's
    learning test, same task and settings); in fp32 the sampler's log-probs are the trainer's."""
    run = tiny_run(
        model_dir,
        letter_dataset(tmp_path / "data.jsonl"),
        group_size=8,
        prompts_per_step=4,
        max_steps=30,
        learning_rate=5e-3,
        max_completion_length=12,
        beta=0.04,
        generation="vllm",
        vllm_sleep=True,
    )
    steps = []

    class Steps(Progress):
        def on_step(self, step, metrics):
            steps.append(metrics)

    assert run.hyperparameters.vllm_sleep  # asked for: a no-op here (a /sleep would fail the run)
    result = train(run, tmp_path / "out", Steps())
    rewards = [m["reward"] for m in steps]
    assert result.final_step == 30 and len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, f"mean reward did not rise: {first:.3f} -> {last:.3f}"
    assert all(m["time/sync"] > 0 for m in steps)  # the weights went to the engine every step
    assert max(abs(m["sampler/ratio_mean"] - 1) for m in steps) < 1e-3
    assert max(m["sampler/logprob_diff_mean_abs"] for m in steps) < 1e-3
