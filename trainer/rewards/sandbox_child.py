"""The child side of the ``code_tests`` sandbox: a script run in a fresh interpreter, never imported.

    python -I sandbox_child.py limit '<limits as JSON>'   trusted: apply the limits, exec stage "run"
    python -I sandbox_child.py run                        read the job on stdin, run it, report

The limits are applied by this trusted first stage and survive the exec, so the untrusted code
starts in a process that already has them. (``preexec_fn`` would do the same in the parent's
forked child, but it is unsafe in a process with threads, and the parent runs sandboxes from a
thread pool.) As root, the first stage also drops every capability before the exec, so the code
cannot raise its limits again or re-enter the host's network namespace.

The job is ``{"nonce", "program", "steps": [{"code", "test"}]}``. The program runs first, then the
steps in order: a test passes when it runs without raising; a setup step that raises fails the
tests after it. At the start and after each test, ``<nonce> <passed> <done>`` is written to the
original stdout; the program's own stdout goes to /dev/null. The nonce, which the program never
sees on its stdin or argv, keeps it from printing a forged result line.
"""

import ctypes
import json
import os
import resource
import sys
import types

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
EXIT_NO_NETWORK_ISOLATION = 97


def leave_network(libc: ctypes.CDLL) -> str | None:
    """Enter a new, empty network namespace; the reason it failed, else None."""
    if libc.unshare(CLONE_NEWNET) == 0:
        return None
    reason = os.strerror(ctypes.get_errno())
    # Without CAP_SYS_ADMIN, a new user namespace may still own a network namespace.
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return None
    return reason


def drop_capabilities(libc: ctypes.CDLL) -> None:
    """Empty the capability bounding set: after the exec, root holds no capabilities."""
    libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    for capability in range(64):  # past the kernel's last capability prctl fails harmlessly
        libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(capability), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0))


def limit(limits: dict) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits["isolate_network"]:
        reason = leave_network(libc)
        if reason is not None:
            sys.stderr.write(f"cannot create a network namespace: {reason}\n")
            sys.exit(EXIT_NO_NETWORK_ISOLATION)
    if os.geteuid() == 0:
        drop_capabilities(libc)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    os.execv(sys.executable, [sys.executable, "-I", os.path.abspath(__file__), "run"])


def execute(source: str, filename: str, namespace: dict) -> bool:
    try:
        exec(compile(source, filename, "exec"), namespace)
    except BaseException:  # SystemExit included: a program that exits has not passed
        return False
    return True


def run() -> None:
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
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
        if step["test"]:
            if ok and execute(step["code"], f"<test {done + 1}>", solution.__dict__):
                passed += 1
            done += 1
            report.write(f"{nonce} {passed} {done}\n")
            report.flush()
        elif ok:
            ok = execute(step["code"], "<test setup>", solution.__dict__)


if __name__ == "__main__":
    if sys.argv[1:2] == ["limit"]:
        limit(json.loads(sys.argv[2]))
    elif sys.argv[1:2] == ["run"]:
        run()
    else:
        sys.exit(f"usage: {sys.argv[0]} limit LIMITS_JSON | run")
