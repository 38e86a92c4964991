"""The test harness of the ``code_tests`` reward: the code ``run_sandboxed`` runs, never imported.

The job comes on stdin: ``{"nonce", "program", "steps": [{"code", "test"}]}``. The program runs
first, then the steps in order: a test passes when it runs without raising; a setup step that
raises fails the tests after it. At the start and after each test, ``<nonce> <passed> <done>``
goes to the original stdout; the program's own stdout goes to /dev/null. The nonce, which the
program never sees on its stdin or argv, keeps it from printing a forged result line; a process
the program forks stops before the tests, so that only the harness's own process reports.

This harness shares its interpreter with the program, so the program can still make its own
tests pass without solving them (an object whose ``__eq__`` is always true, patched builtins,
the nonce read from the harness's memory). That games its own score only: the sandbox keeps it
from touching the host, other completions or their scores.
"""

import json
import os
import sys
import types


def execute(source: str, filename: str, namespace: dict) -> bool:
    try:
        exec(compile(source, filename, "exec"), namespace)
    except BaseException:  # SystemExit included: a program that exits has not passed
        return False
    return True


def main() -> None:
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    harness_pid = os.getpid()
    report = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    nonce = job.pop("nonce")
    report.write(f"{nonce} 0 0\n")
    report.flush()

    # A real module, so that dataclasses, pickle and typing find the program's globals.
    solution = types.ModuleType("solution")
    sys.modules["solution"] = solution
    ok = execute(job["program"], "solution.py", solution.__dict__)
    passed = done = 0
    for step in job["steps"]:
        if os.getpid() != harness_pid:  # a fork of the program's that returned into the harness
            os._exit(1)
        if step["test"]:
            if ok and execute(step["code"], f"<test {done + 1}>", solution.__dict__):
                passed += 1
            done += 1
            if os.getpid() != harness_pid:
                os._exit(1)
            report.write(f"{nonce} {passed} {done}\n")
            report.flush()
        elif ok:
            ok = execute(step["code"], "<test setup>", solution.__dict__)


if __name__ == "__main__":
    main()
