"""Datasets, prompt sampling and config validation: bad input is named precisely."""

import pytest

from trainer.__main__ import policy_from_environ
from trainer.config import ConfigError, GRPOConfig, OperatorPolicy, RunConfig
from trainer.data import PromptSampler, parse_rows
from trainer.errors import DatasetError


def test_rows_keep_every_field_and_accept_chat_prompts():
    rows = parse_rows(['{"prompt": "1+1?", "answer": "2", "tests": ["assert True"]}', "",
                       '{"prompt": [{"role": "user", "content": "hi"}]}'])
    assert rows[0]["answer"] == "2" and rows[0]["tests"] == ["assert True"]
    assert rows[1]["prompt"][0]["role"] == "user"


@pytest.mark.parametrize(("lines", "message"), [
    (['{"prompt": "ok"}', "{not json"], "line 2: not valid JSON"),
    (['{"prompt": "ok"}', '{"question": "x"}'], "line 2: missing 'prompt'"),
    (['[1, 2]'], "line 1: expected a JSON object"),
    (['{"prompt": "  "}'], "line 1: 'prompt' is empty"),
    (['{"prompt": [{"role": "user"}]}'], "line 1: 'prompt'[0] must be a message"),
    ([""], "no rows"),
])
def test_malformed_rows_are_reported_with_their_line(lines, message):
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_rows(lines)


def test_prompt_sampler_visits_every_row_each_epoch_and_resumes():
    sampler = PromptSampler(5, seed=3)
    first_epoch = sampler.draw(5)
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]
    sampler.draw(2)
    copy = PromptSampler(5, seed=3)
    copy.load_state_dict(sampler.state_dict())
    assert copy.draw(7) == sampler.draw(7)


@pytest.mark.parametrize(("values", "param", "hint"), [
    ({"group_size": 1}, "hyperparameters.group_size", "must be >= 2"),
    ({"loss_type": "ppo"}, "hyperparameters.loss_type", "expected one of grpo, bnpo, dr_grpo, dapo"),
    ({"scale_rewards": "yes"}, "hyperparameters.scale_rewards", "expected one of group, batch, none"),
    ({"importance_sampling_level": "doc"}, "hyperparameters.importance_sampling_level", "token, sequence"),
    ({"top_p": 1.5}, "hyperparameters.top_p", "must be in (0, 1]"),
    ({"learning_rate": "fast"}, "hyperparameters.learning_rate", "must be a number"),
    ({"lr": 1e-5}, "hyperparameters.lr", "unknown hyperparameter 'lr'"),
    ({"lora": {"r": 0}}, "hyperparameters.lora.r", "must be >= 1"),
    ({"lora": {"rank": 8}}, "hyperparameters.lora.rank", "unknown LoRA option"),
    ({"delta": 0.5}, "hyperparameters.delta", "must be >= 1"),
])
def test_config_errors_name_the_field_and_the_fix(values, param, hint):
    with pytest.raises(ConfigError) as caught:
        GRPOConfig.from_dict(values)
    assert caught.value.param == param
    assert hint in str(caught.value)


def test_run_config_from_spec_takes_top_level_group_size():
    run = RunConfig.from_spec({"base_model": "m", "dataset": "d.jsonl", "group_size": 4,
                               "reward": {"type": "exact_match"}, "hyperparameters": {"lora": {"r": 8}}})
    assert run.hyperparameters.group_size == 4 and run.hyperparameters.lora.r == 8
    assert run.reward == [{"type": "exact_match"}]
    with pytest.raises(ConfigError, match="base_model: is required"):
        RunConfig.from_spec({"dataset": "d", "reward": []})


def test_only_the_cli_reads_the_operators_allowances_from_the_environment():
    assert policy_from_environ({}) == OperatorPolicy() == RunConfig.from_spec(
        {"base_model": "m", "dataset": "d.jsonl", "reward": [{"type": "exact_match"}]}).policy
    environ = {"GRPO_ALLOW_PRIVATE_HOSTS": " 127.0.0.1, scorer.internal ,", "GRPO_SANDBOX_ALLOW_UNISOLATED": "1",
               "GRPO_SANDBOX_ALLOW_NETWORK": "true"}
    assert policy_from_environ(environ) == OperatorPolicy(allow_private_hosts=("127.0.0.1", "scorer.internal"),
                                                          sandbox_allow_unisolated=True, sandbox_allow_network=True)
