"""POST /v1/rewards/run: a reward spec tried on given completions, in the API process."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.service.factories import ROOT, api_key, settings_env

REWARD = [{"type": "exact_match"}, {"type": "regex", "pattern": "^<think>", "weight": 0.5}]


def run(client, reward=None, samples=None, **request):
    samples = (
        samples
        if samples is not None
        else [{"prompt": "What is 2 + 3?", "completion": "5", "row": {"answer": "5"}}]
    )
    return client.post("/v1/rewards/run", json={"reward": reward or REWARD, "samples": samples}, **request)


def test_each_sample_gets_its_total_its_parts_and_its_errors(client) -> None:
    response = run(
        client,
        samples=[
            {"prompt": "What is 2 + 3?", "completion": "<think>2 and 3</think> 5", "row": {"answer": "5"}},
            {"prompt": "What is 2 + 3?", "completion": "6", "row": {"answer": "5"}},
            {"completion": "<think>", "row": {"prompt": "What is 1 + 1?"}},  # no answer: exact_match errors
        ],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [spec["name"] for spec in body["reward"]] == ["exact_match", "regex"]
    assert body["data"] == [
        {"total": 1.5, "parts": {"exact_match": 1.0, "regex": 1.0}, "errors": []},
        {"total": 0.0, "parts": {"exact_match": 0.0, "regex": 0.0}, "errors": []},
        {"total": 0.5, "parts": {"exact_match": None, "regex": 1.0}, "errors": ["exact_match"]},
    ]
    assert body["errors"] == {"exact_match": 1, "regex": 0}
    assert len(body["error_messages"]) == 1 and "'answer'" in body["error_messages"][0]


def test_code_is_run_against_the_rows_tests(client) -> None:
    program = "```python\ndef add(a, b):\n    return a + b\n```"
    row = {"tests": ["assert add(2, 3) == 5", "assert add(0, 0) == 0"]}
    response = run(
        client,
        reward=[{"type": "code_tests"}],
        samples=[
            {"prompt": "Write add.", "completion": program, "row": row},
            {"prompt": "Write add.", "completion": program.replace("a + b", "a - b"), "row": row},
        ],
    )
    assert response.status_code == 200, response.text
    assert [score["total"] for score in response.json()["data"]] == [1.0, 0.5]


@pytest.mark.parametrize(
    ("reward", "param", "says"),
    [
        ([{"type": "telepathy"}], "reward[0].type", "unknown reward type"),
        ([{"type": "exact_match"}, {"type": "regex"}], "reward[1].pattern", "required"),
        ([{"type": "regex", "pattern": "("}], "reward[0].pattern", "not a valid regular expression"),
        ([{"type": "reward_model", "model": "org/rm"}], "reward[0].type", "does not"),
    ],
)
def test_a_bad_spec_is_a_422_that_names_the_field(client, reward, param, says) -> None:
    response = run(client, reward=reward)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_private_hosts_and_networks_for_code_are_the_operators_to_allow(client, settings) -> None:
    http = [{"type": "http", "url": "http://127.0.0.1:9/score", "retries": 0}]
    refused = run(client, reward=http).json()["error"]
    assert refused["param"] == "reward[0].url" and "GRPO_ALLOW_PRIVATE_HOSTS" in refused["message"]
    spec_allowed = run(client, reward=[{**http[0], "allowed_hosts": ["127.0.0.1"]}]).json()["error"]
    assert (
        spec_allowed["param"] == "reward[0].allowed_hosts" and "operator setting" in spec_allowed["message"]
    )
    networked = run(client, reward=[{"type": "code_tests", "allow_network": True}]).json()["error"]
    assert networked["param"] == "reward[0].allow_network"

    settings.allow_private_hosts = [
        "127.0.0.1"
    ]  # now the dry-run calls it (nothing listens: a counted error)
    response = run(client, reward=http)
    assert response.status_code == 200, response.text
    assert (
        response.json()["errors"] == {"http": 1} and "cannot connect" in response.json()["error_messages"][0]
    )


def test_the_number_of_samples_is_bounded(client, settings) -> None:
    settings.max_reward_run_samples = 2
    response = run(client, samples=[{"completion": str(i), "row": {"answer": "1"}} for i in range(3)])
    assert response.status_code == 422
    assert response.json()["error"] | {"message": ""} == {
        "code": "limit_exceeded",
        "message": "",
        "param": "samples",
    }
    assert "GRPO_MAX_REWARD_RUN_SAMPLES" in response.json()["error"]["message"]
    assert run(client, samples=[]).json()["error"]["param"] == "samples"


def test_the_number_of_reward_functions_is_bounded(client, settings) -> None:
    settings.max_reward_run_rewards = 3
    response = run(
        client, reward=[{"type": "length", "name": f"length_{i}", "max_length": 10} for i in range(4)]
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("limit_exceeded", "reward")
    assert "GRPO_MAX_REWARD_RUN_REWARDS" in error["message"]
    assert (
        run(
            client, reward=[{"type": "length", "name": f"length_{i}", "max_length": 10} for i in range(3)]
        ).status_code
        == 200
    )


def test_a_dry_run_needs_an_api_key(client) -> None:
    assert run(client, headers={"Authorization": ""}).status_code == 401


def test_scoring_loads_no_torch_into_the_api_process(settings) -> None:
    code = (
        "import sys; from fastapi.testclient import TestClient; import api.main; "
        "r = TestClient(api.main.app).post('/v1/rewards/run', headers={'Authorization': sys.argv[1]}, json={"
        "'reward': [{'type': 'math'}, {'type': 'code_tests'}, {'type': 'length', 'max_length': 10}], "
        "'samples': [{'completion': 'x = 1', 'row': {'answer': '1', 'tests': ['assert x == 1']}}]}); "
        "assert r.status_code == 200, r.text; "
        "loaded = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not loaded, loaded"
    )
    subprocess.run(
        [sys.executable, "-c", code, f"Bearer {api_key(settings)}"],
        cwd=ROOT,
        env=settings_env(settings),
        check=True,
        timeout=60,
    )


def test_a_pathological_expression_or_pattern_is_a_counted_error_not_a_hung_request(client) -> None:
    """The dry-run scores on the API's worker threads, where math-verify's signal-based timeout
    cannot run: 9^(9^(9^9)) would keep sympy busy for hours, "(a|a)+$" backtracks 2**40 ways."""
    reward = [{"type": "math", "timeout_s": 1}, {"type": "regex", "pattern": "(a|a)+$"}]
    samples = [
        {"completion": "$\\boxed{9^{9^{9^{9}}}}$ " + "a" * 40 + "!", "row": {"answer": "2"}},
        {"completion": "$\\boxed{2}$", "row": {"answer": "2"}},
    ]
    run(client, reward=reward[:1], samples=samples[1:])  # a math-verify process started, outside the timing
    started = time.monotonic()
    response = run(client, reward=reward, samples=samples)
    assert response.status_code == 200, response.text
    # Counted below (one error each); this bound only tells "stopped" from "busy for hours", generous
    # for a loaded 2-core CI.
    assert time.monotonic() - started < 60
    body = response.json()
    assert body["errors"] == {"math": 1, "regex": 1}
    assert [score["errors"] for score in body["data"]] == [["math", "regex"], []]
    assert "math: math-verify timed out after 1s" in body["error_messages"][0]
    assert "regex: the pattern '(a|a)+$' timed out after 1s" in body["error_messages"][1]
