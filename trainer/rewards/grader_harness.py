"""The harness of the ``python_grader`` reward: the code ``run_sandboxed`` runs, never imported.

The job comes on stdin: ``{"nonce", "source", "cases": [{"sample", "item"}], "timeout_s"}``. The
source runs once, then ``grade(sample, item)`` once per case, each call stopped after
``timeout_s`` (a SIGALRM). Lines on the original stdout, each starting with the nonce:
``start ok 0`` once the harness runs, ``setup error "<why>"`` when the source fails, and then
``<index> ok <score>`` or ``<index> error "<why>"`` per case. The grader's own stdout goes to
/dev/null; the nonce keeps it from forging lines there, and a process it forks stops before
reporting, so only the harness's own process reports.

The grader shares this interpreter, so it can tamper with its own grades: it is the job owner's
code scoring the job owner's run. The sandbox keeps it from touching the host.
"""

import json
import math
import os
import signal
import sys
import traceback
import types


class GradeTimeout(Exception):
    pass


def describe(exc: BaseException) -> str:
    """``TypeError: ... (grader.py line 3)``: the error and where in the grader's source it came from."""
    lines = [
        frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == "grader.py"
    ]
    where = f" (grader.py line {lines[-1]})" if lines else ""
    return f"{type(exc).__name__}: {exc}"[:300] + where


def on_alarm(signum, frame):
    raise GradeTimeout("grade() took longer than its time limit")


def main() -> None:
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    harness_pid = os.getpid()
    report = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    nonce = job.pop("nonce")

    def say(index, outcome, value) -> None:
        if os.getpid() != harness_pid:  # a fork of the grader's that returned into the harness
            os._exit(1)
        report.write(f"{nonce} {index} {outcome} {json.dumps(value)}\n")
        report.flush()

    say("start", "ok", 0)
    grader = types.ModuleType("grader")  # a real module, so that dataclasses and pickle find its globals
    sys.modules["grader"] = grader
    try:
        exec(compile(job["source"], "grader.py", "exec"), grader.__dict__)
        grade = grader.__dict__.get("grade")
        if not callable(grade):
            raise TypeError("the source defines no function grade(sample, item)")
    except BaseException as exc:  # SystemExit included
        say("setup", "error", describe(exc))
        return
    signal.signal(signal.SIGALRM, on_alarm)
    for index, case in enumerate(job["cases"]):
        try:
            signal.setitimer(signal.ITIMER_REAL, job["timeout_s"])
            try:
                value = grade(case["sample"], case["item"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"grade() must return a number, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"grade() returned {value}")
        except BaseException as exc:
            say(index, "error", describe(exc))
            continue
        say(index, "ok", value)


if __name__ == "__main__":
    main()
