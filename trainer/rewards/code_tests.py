"""The ``code_tests`` reward: run the completion's code against the row's tests in a sandbox.

The sandbox is a first one, to be hardened: a fresh ``python -I`` with an empty environment, a
scratch working directory removed afterwards, CPU, memory, file-size and process limits, no
network (a new network namespace), a wall-clock timeout that kills the process group, and, when
run as root, no capabilities. It does not hide the file system, and a program that inspects the
harness's frames could forge its result; see ``sandbox_child.py`` for the child's side.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.rewards.base import Option, RewardError, RewardType, Scores, row_value

SANDBOX_SCRIPT = Path(__file__).with_name("sandbox_child.py")
EXIT_NO_NETWORK_ISOLATION = 97  # as in sandbox_child.py
STARTUP_SLACK_S = 2.0  # wall-clock allowance for starting two interpreters on a busy machine
FILE_LIMIT_BYTES = 10 * 2**20
MAX_PROCESSES = 32
MAX_WORKERS = 8

_CODE_BLOCK = re.compile(r"```([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "python3", "py"}


class SandboxError(RewardError):
    """The sandbox could not run the program at all (not: the program failed its tests)."""


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
            raise RewardError(f"the row's tests are not valid Python ({exc.msg}, line {exc.lineno})") from None
        steps = [{"code": ast.unparse(node), "test": isinstance(node, ast.Assert)} for node in tree.body]
        return steps if any(step["test"] for step in steps) else [{"code": tests, "test": True}]
    raise RewardError("the row's tests must be a non-empty list of assert statements (strings) or one "
                      f"string of Python code, got {type(tests).__name__}")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    isolate_network: bool = True


def run_in_sandbox(program: str, steps: list[dict[str, Any]], limits: SandboxLimits) -> tuple[int, int]:
    """Run ``program`` then ``steps`` in a sandboxed interpreter: (tests passed, tests run).

    Tests not reached before a time or memory limit count as run and failed by the caller.
    Raises SandboxError when the sandbox itself cannot start.
    """
    nonce = secrets.token_hex(16)
    job = json.dumps({"nonce": nonce, "program": program, "steps": steps}).encode()
    child_limits = json.dumps({
        "cpu_s": max(1, math.ceil(limits.timeout_s)),
        "memory_bytes": limits.memory_mb * 2**20,
        "file_bytes": FILE_LIMIT_BYTES,
        "max_processes": MAX_PROCESSES,
        "isolate_network": limits.isolate_network,
    })
    scratch = Path(tempfile.mkdtemp(prefix="grpo-code-"))
    try:
        workdir = scratch / "work"
        workdir.mkdir()
        with open(scratch / "stdout", "w+b") as out, open(scratch / "stderr", "w+b") as err:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-I", str(SANDBOX_SCRIPT), "limit", child_limits],
                    stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env={},
                    start_new_session=True,  # its own process group, killed as a whole below
                )
            except OSError as exc:
                raise SandboxError(f"could not start the sandbox: {exc}") from None
            timed_out = False
            try:
                process.communicate(job, timeout=limits.timeout_s + STARTUP_SLACK_S)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process.pid)  # also whatever the program left running in the background
                process.wait()
            out.seek(0)
            report = out.read().decode("utf-8", "replace")
            err.seek(0)
            stderr_tail = err.read()[-1000:].decode("utf-8", "replace").strip()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    progress = re.findall(rf"^{nonce} (\d+) (\d+)$", report, re.MULTILINE)
    if progress:
        passed, done = progress[-1]
        return int(passed), int(done)
    if process.returncode == EXIT_NO_NETWORK_ISOLATION:
        raise SandboxError(f"refusing to run code with network access ({stderr_tail}); run the trainer where "
                           "it may create network namespaces (root or CAP_SYS_ADMIN), or set "
                           "allow_network: true in the code_tests reward to run without network isolation")
    if timed_out:
        raise SandboxError(f"the sandbox did not start within {limits.timeout_s + STARTUP_SLACK_S:g} s")
    raise SandboxError(f"the sandbox failed to start (exit status {process.returncode}): {stderr_tail[-300:]}")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class CodeTests:
    """Scores a batch: each completion's program runs in its own sandbox, a few at a time."""

    def __init__(self, spec: dict[str, Any]):
        self.field = spec["field"]
        self.partial = spec["partial"]
        self.limits = SandboxLimits(spec["timeout_s"], spec["memory_mb"], not spec["allow_network"])

    def score(self, completion: str, row: dict[str, Any]) -> float:
        steps = split_tests(row_value(row, self.field))
        total = sum(step["test"] for step in steps)
        passed, _ = run_in_sandbox(extract_program(completion), steps, self.limits)
        if self.partial:
            return passed / total
        return 1.0 if passed == total else 0.0

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> Scores:
        workers = max(1, min(len(completions), os.cpu_count() or 1, MAX_WORKERS))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-tests") as pool:
            futures = [pool.submit(self.score, completion, row)
                       for completion, row in zip(completions, rows, strict=True)]
        scores: Scores = []
        for future in futures:
            try:
                scores.append(future.result())
            except Exception as exc:
                scores.append(exc)
        return scores

    def close(self) -> None:
        pass


CODE_TESTS = RewardType(
    summary="the share of row[field]'s tests the completion's Python code passes, run in a sandbox",
    options={
        "field": Option("string", "tests"),
        "timeout_s": Option("number", 5.0, above=0),
        "memory_mb": Option("integer", 512, minimum=64),
        "partial": Option("boolean", True),
        "allow_network": Option("boolean", False),
    },
    build=lambda spec, **_: CodeTests(spec),
    fields=lambda spec: {spec["field"]},
)
