"""POST /v1/rewards/run: a reward spec tried on given completions, in the API process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
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
        ([{"type": "regex", "pattern": "a{1001}"}], "reward[0].pattern", "repeat count 1001 exceeds 1000"),
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


# Run by the API in a child held to 4 GB of address space (room for thread stacks and malloc
# arenas): compiled, the first two would ask it for ~21 GB (the process killed, or a 500 under a
# limit), the third for 260 MB and a second.
TOO_LARGE = [
    ({"type": "regex", "pattern": "a{1000000000}"}, "repeat count 1000000000 exceeds 1000"),
    (
        {"type": "exact_match", "extract": "regex", "pattern": "(\\d){1000000000}"},
        "repeat count 1000000000 exceeds 1000",
    ),
    ({"type": "regex", "pattern": "(a{1000}){1000}"}, "expand it to 1,003,002 elements, at most 10,000"),
]
API_UNDER_A_MEMORY_LIMIT = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4_000_000_000, 4_000_000_000))
    from fastapi.testclient import TestClient
    import api.main

    answers = []
    with TestClient(api.main.app, headers={"Authorization": sys.argv[1]}) as client:
        for spec in json.loads(sys.argv[2]):
            scored = client.post("/v1/rewards/run", json={"reward": [spec], "samples": [{"completion": "a"}]})
            job = {"dataset_id": "ds_x", "base_model": "org/model", "reward": [spec]}
            estimated = client.post("/v1/jobs", params={"dry_run": "true"}, json=job)
            answers.append([[r.status_code, r.json()] for r in (scored, estimated)])
        at_limit = {"type": "regex", "pattern": "^(?:a{1000}){9}$", "full_match": True}
        samples = [{"completion": "a" * 9000}, {"completion": "a" * 8999}]
        after = client.post("/v1/rewards/run", json={"reward": [at_limit], "samples": samples})
        answers.append([after.status_code, after.json()])
    print(json.dumps(answers))
    """
)


def test_a_pattern_too_large_to_compile_is_a_422_naming_it_and_the_api_stays_up(settings) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            API_UNDER_A_MEMORY_LIMIT,
            f"Bearer {api_key(settings)}",
            json.dumps([spec for spec, _ in TOO_LARGE]),
        ],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *refused, (status, body) = json.loads(result.stdout.splitlines()[-1])
    for (_, says), answers in zip(TOO_LARGE, refused, strict=True):
        for code, answer in answers:  # /v1/rewards/run, then POST /v1/jobs?dry_run=true
            assert code == 422, answer
            assert answer["error"]["param"] == "reward[0].pattern"
            assert says in answer["error"]["message"], answer
    assert status == 200, body  # the same process, still up: a pattern at the limits compiles and scores
    assert [score["total"] for score in body["data"]] == [1.0, 0.0]
