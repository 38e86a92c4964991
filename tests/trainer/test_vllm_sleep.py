"""The order in which ``VLLMSampler`` puts its engine to sleep and wakes it, against a stand-in
server (tests/trainer/vllm_fake_server.py) that records the HTTP calls: vLLM's CPU build has no
sleep mode, so no real engine here can sleep. The real server on CPU (it reports it cannot sleep,
refuses /sleep, and the sampler never asks) is tested in test_vllm_engine.py.

The sequence checked is the one vLLM's sleep mode asks of a caller: asleep, the engine generates
nothing and loads nothing; a push wakes the weights, loads into them, and the KV cache wakes with
the next generation; weights a level-2 sleep discarded are loaded again before anything samples.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.config import GRPOConfig
from trainer.generation.vllm import VLLMSampler
from trainer.tiny import make_tiny_model

FAKE_SERVER = Path(__file__).with_name("vllm_fake_server.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sleep-llama"), num_layers=1)


@pytest.fixture
def policy(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """An "interpreter" for the sampler that runs the stand-in with the real server's arguments."""
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SERVER}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def start(policy, fake_python, **options) -> VLLMSampler:
    config = GRPOConfig(
        max_prompt_length=16, max_completion_length=4, vllm_sleep=options.pop("vllm_sleep", True)
    )
    return VLLMSampler(config, policy, python=fake_python, startup_timeout_s=60, **options)


def generate(sampler: VLLMSampler) -> None:
    rollout = sampler.generate(
        [torch.tensor([1, 2, 3])],
        group_size=2,
        max_new_tokens=4,
        eos_token_ids=[0],
        pad_id=0,
        temperature=1.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert [c.tolist() for c in rollout.completion_ids] == [[5, 6], [5, 6]]


def recorded(sampler: VLLMSampler) -> tuple[list[str], list[list]]:
    """The stand-in's arguments and its calls so far: [route, body, what it saw]."""
    answer = sampler.client.request("GET", "/calls")
    return answer["argv"], answer["calls"]


def steps(calls: list[list]) -> list[tuple]:
    """Each call as (route, its level or tags), the rest of the body left out."""
    detail = {"/sleep": "level", "/wake_up": "tags"}
    return [(route, body.get(detail[route])) if route in detail else (route,) for route, body, _ in calls]


def test_full_weights_sleep_at_level_2_and_are_loaded_before_the_kv_cache_wakes(policy, fake_python):
    sampler = start(policy, fake_python)
    try:
        assert sampler.sleep_level == 2
        generate(sampler)  # step 1's rollout
        sampler.sync(policy)  # after its optimizer step
        generate(sampler)  # step 2's rollout
        # an evaluation (or a dynamic-sampling round) right after: no push since the sleep
        generate(sampler)
        argv, calls = recorded(sampler)
    finally:
        sampler.close()

    assert "--sleep-mode" in argv
    assert steps(calls) == [
        ("/generate",),
        ("/sleep", 2),  # the weights are replaced at the next push: discarded, not kept on the host
        ("/wake_up", ["weights"]),
        ("/load_weights",),
        ("/wake_up", ["kv_cache"]),  # with the generation, not before
        ("/generate",),
        ("/sleep", 2),
        ("/wake_up", ["weights"]),
        ("/load_weights",),  # the discarded weights again, before anything samples from them
        ("/wake_up", ["kv_cache"]),
        ("/generate",),
        ("/sleep", 2),
    ]
    pushed, reloaded = calls[3], calls[8]
    assert reloaded[1]["path"] == pushed[1]["path"]  # the last pushed, kept for this
    assert reloaded[2]["files"] == pushed[2]["files"] == ["model.safetensors"]
    assert not Path(pushed[1]["path"]).exists()  # and removed with the sampler


def test_weights_discarded_before_any_push_are_the_policys(policy, fake_python):
    sampler = start(policy, fake_python)
    try:
        generate(sampler)
        generate(sampler)  # dynamic sampling's second round of step 1: nothing was pushed yet
        _, calls = recorded(sampler)
    finally:
        sampler.close()
    assert steps(calls) == [
        ("/generate",),
        ("/sleep", 2),
        ("/wake_up", ["weights"]),
        ("/load_weights",),
        ("/wake_up", ["kv_cache"]),
        ("/generate",),
        ("/sleep", 2),
    ]
    assert calls[3][2]["files"] == ["model.safetensors"]
    assert sampler.syncs == 1  # a push of the policy's weights, which are the engine's


def test_a_lora_policy_sleeps_at_level_1_keeping_the_base_weights(policy, fake_python):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(policy, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    sampler = start(lora, fake_python)
    try:
        assert sampler.sleep_level == 1
        generate(sampler)
        sampler.sync(lora)
        generate(sampler)
        generate(sampler)  # no push between: the base weights come back from host memory
        _, calls = recorded(sampler)
    finally:
        sampler.close()
    assert steps(calls) == [
        ("/generate",),
        ("/sleep", 1),
        ("/wake_up", ["weights"]),  # the adapter's slots are with the weights
        ("/load_lora",),
        ("/wake_up", ["kv_cache"]),
        ("/generate",),
        ("/sleep", 1),
        ("/wake_up", ["weights", "kv_cache"]),
        ("/generate",),
        ("/sleep", 1),
    ]
    assert "adapter_model.safetensors" in calls[3][2]["files"]


@pytest.mark.parametrize("why", ["turned off", "no sleep mode here"])
def test_an_engine_that_cannot_sleep_is_never_asked_to(policy, fake_python, monkeypatch, why):
    if why == "no sleep mode here":  # the server reports can_sleep false, as vLLM's CPU build does
        monkeypatch.setenv("GRPO_FAKE_VLLM_CAN_SLEEP", "0")
    sampler = start(policy, fake_python, vllm_sleep=why != "turned off")
    try:
        assert sampler.sleep_level == 0
        generate(sampler)
        sampler.sync(policy)
        generate(sampler)
        argv, calls = recorded(sampler)
    finally:
        sampler.close()
    assert ("--sleep-mode" in argv) == (why != "turned off")
    assert steps(calls) == [("/generate",), ("/load_weights",), ("/generate",)]


def test_a_server_given_by_url_is_never_put_to_sleep(policy, fake_python):
    """It may serve other samplers (an operator's server, or another sampler's child)."""
    owner = start(policy, fake_python)
    try:
        client = VLLMSampler(
            GRPOConfig(max_prompt_length=16, max_completion_length=4), policy, url=owner.url, upload=False
        )
        assert client.sleep_level == 0
        generate(client)
        client.sync(policy)
        generate(client)
        _, calls = recorded(owner)
    finally:
        owner.close()
    assert steps(calls) == [("/generate",), ("/load_weights",), ("/generate",)]
