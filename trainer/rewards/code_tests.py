"""The ``code_tests`` reward: run the completion's code against the row's tests in a sandbox.

Each completion's program and the row's tests run together in ``code_harness.py`` inside
``run_sandboxed`` (see ``sandbox.py`` for the layers and the residual risks, and
``code_harness.py`` for how far a program can game its own score). A program that fails, exits,
times out or hits a limit scores the tests it passed before; a sandbox that cannot run at all
(or may not, on a machine without namespaces) is a counted error with the reason.
``allow_network: true`` is accepted only where the operator allows it (``OperatorPolicy``'s
``sandbox_allow_network``, the ``GRPO_SANDBOX_ALLOW_NETWORK`` setting); running without namespaces
where the machine refuses them is the operator's call too (``sandbox_allow_unisolated``).
"""

from __future__ import annotations

import ast
import contextvars
import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, OperatorPolicy
from trainer.rewards.base import Option, RewardError, RewardType, Scores, row_value
from trainer.rewards.sandbox import STARTUP_SLACK_S, SandboxError, run_sandboxed
from trainer.rewards.stop import current_stop

HARNESS = Path(__file__).with_name("code_harness.py")
ALLOW_NETWORK_ENV = "GRPO_SANDBOX_ALLOW_NETWORK"
FILE_LIMIT_MB = 10
MAX_PROCESSES = 8  # processes (and threads) per program; each may use memory_mb
MAX_WORKERS = 8
MAX_TIMEOUT_S = 60.0
MAX_MEMORY_MB = 4096

_CODE_BLOCK = re.compile(r"```([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "python3", "py"}


def extract_program(completion: str) -> str:
    """The last ```python block, else the last untagged ``` block, else the whole completion.

    A block left open at the end (a truncated completion) runs to the end of the text.
    """
    blocks = [(match.group(1).lower(), match.group(2)) for match in _CODE_BLOCK.finditer(completion)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: not tag):
        chosen = [code for tag, code in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return completion


def split_tests(tests: Any) -> list[dict[str, Any]]:
    """The row's tests as sandbox steps.

    A list of strings: each is one test. One string: each top-level ``assert`` is a test and the
    other statements run in order as setup; a string without asserts is a single test.
    """
    if isinstance(tests, list) and tests and all(isinstance(test, str) for test in tests):
        return [{"code": test, "test": True} for test in tests]
    if isinstance(tests, str) and tests.strip():
        try:
            tree = ast.parse(tests)
        except SyntaxError as exc:
            raise RewardError(
                f"the row's tests are not valid Python ({exc.msg}, line {exc.lineno})"
            ) from None
        steps = [{"code": ast.unparse(node), "test": isinstance(node, ast.Assert)} for node in tree.body]
        return steps if any(step["test"] for step in steps) else [{"code": tests, "test": True}]
    raise RewardError(
        "the row's tests must be a non-empty list of assert statements (strings) or one "
        f"string of Python code, got {type(tests).__name__}"
    )


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    network: bool = False
    allow_unisolated: bool = False  # the operator's: limits only where the machine refuses namespaces


@cache
def harness_source() -> str:
    return HARNESS.read_text(encoding="utf-8")


def run_tests(program: str, steps: list[dict[str, Any]], limits: SandboxLimits) -> tuple[int, int]:
    """Run ``program`` then ``steps`` in the sandbox: (tests passed, tests run).

    Tests not reached before a time or memory limit count as run and failed by the caller.
    Raises SandboxError when the sandbox itself cannot run.
    """
    nonce = secrets.token_hex(16)
    job = json.dumps({"nonce": nonce, "program": program, "steps": steps}).encode()
    result = run_sandboxed(
        harness_source(),
        stdin=job,
        timeout_s=limits.timeout_s,
        memory_mb=limits.memory_mb,
        file_mb=FILE_LIMIT_MB,
        max_processes=MAX_PROCESSES,
        network=limits.network,
        allow_unisolated=limits.allow_unisolated,
        stop=current_stop(),
    )
    report = result.stdout.decode("utf-8", "replace")
    progress = re.findall(rf"^{nonce} (\d+) (\d+)$", report, re.MULTILINE)
    if progress:
        passed, done = progress[-1]
        return int(passed), int(done)
    if result.timed_out:
        raise SandboxError(f"the sandbox did not start within {limits.timeout_s + STARTUP_SLACK_S:g} s")
    stderr_tail = result.stderr[-300:].decode("utf-8", "replace").strip()
    raise SandboxError(f"the test harness did not start ({result.describe()}): {stderr_tail}")


class CodeTests:
    """Scores a batch: each completion's program runs in its own sandbox, a few at a time."""

    def __init__(self, spec: dict[str, Any], policy: OperatorPolicy):
        self.field = spec["field"]
        self.partial = spec["partial"]
        self.limits = SandboxLimits(
            spec["timeout_s"], spec["memory_mb"], spec["allow_network"], policy.sandbox_allow_unisolated
        )

    def score(self, completion: str, row: dict[str, Any]) -> float:
        steps = split_tests(row_value(row, self.field))
        total = sum(step["test"] for step in steps)
        passed, _ = run_tests(extract_program(completion), steps, self.limits)
        if self.partial:
            return passed / total
        return 1.0 if passed == total else 0.0

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> Scores:
        workers = max(1, min(len(completions), os.cpu_count() or 1, MAX_WORKERS))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-tests") as pool:
            # each in a copy of this context: a stop signal (``current_stop``) reaches the sandboxes
            futures = [
                pool.submit(contextvars.copy_context().run, self.score, completion, row)
                for completion, row in zip(completions, rows, strict=True)
            ]
        scores: Scores = []
        for future in futures:
            try:
                scores.append(future.result())
            except Exception as exc:
                scores.append(exc)
        return scores

    def close(self) -> None:
        pass


def _check_code_tests(spec: dict[str, Any], param: str) -> None:
    if spec["timeout_s"] > MAX_TIMEOUT_S:
        raise ConfigError(f"{param}.timeout_s", f"must be <= {MAX_TIMEOUT_S:g} s, got {spec['timeout_s']:g}")
    if spec["memory_mb"] > MAX_MEMORY_MB:
        raise ConfigError(f"{param}.memory_mb", f"must be <= {MAX_MEMORY_MB}, got {spec['memory_mb']}")


def _check_code_tests_policy(spec: dict[str, Any], param: str, policy: OperatorPolicy) -> None:
    if spec["allow_network"] and not policy.sandbox_allow_network:
        raise ConfigError(
            f"{param}.allow_network",
            "code from completions runs without network access; the "
            f"operator may allow it by setting {ALLOW_NETWORK_ENV}=1 on the API and the workers",
        )


CODE_TESTS = RewardType(
    summary="the share of row[field]'s tests the completion's Python code passes, run in a sandbox",
    options={
        "field": Option("string", "tests"),
        "timeout_s": Option("number", 5.0, above=0),
        "memory_mb": Option("integer", 512, minimum=64),
        "partial": Option("boolean", True),
        "allow_network": Option("boolean", False),
    },
    check=_check_code_tests,
    check_policy=_check_code_tests_policy,
    build=lambda spec, *, policy, **_: CodeTests(spec, policy),
    fields=lambda spec: {spec["field"]},
)
