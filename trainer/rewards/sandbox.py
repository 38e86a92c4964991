"""Run untrusted Python: ``run_sandboxed(code, timeout_s=, memory_mb=) -> SandboxResult``.

Used by the ``code_tests`` reward (code from completions) and meant for any later reward that
runs user-supplied code. Each call runs ``code`` in a fresh interpreter set up by the trusted
``sandbox_launcher.py``. The layers, and what each one stops:

- **A new mount namespace with a minimal root**: a read-only tmpfs holding the OS library
  directories and the Python installation bind-mounted read-only (site-packages hidden), a
  made-up /etc/passwd, four /dev nodes, and private noexec tmpfs at /tmp (the working directory)
  and /dev/shm. The program cannot read or write the project, /root, the database, the data
  directories or the host's /etc, and what it writes vanishes with the run. The host's tree is
  detached (pivot_root) and the program runs one chroot deeper, which also bars it from
  creating user namespaces (the door to much of the kernel's namespace-only code).
- **A new network namespace**: an unconfigured loopback only; no TCP, UDP or DNS anywhere, the
  host's 127.0.0.1 included. ``network=True`` skips it (the host's network, without DNS
  configuration).
- **A new PID namespace** whose init is a trusted root process: the program sees and can signal
  only its own processes, and when it exits, or the parent kills the launcher at the wall-clock
  limit, the kernel kills everything left in the namespace: no process outlives a run.
- **New IPC and UTS namespaces**: none of the host's System V shared memory (PostgreSQL's) or queues.
- **An unprivileged, random uid** (one of 2**24 from ``UID_BASE``, in no /etc/passwd), an empty
  capability bounding set and no_new_privs: root's powers are gone, so RLIMIT_NPROC (which root
  ignores) caps processes and threads, and concurrent runs do not share the count.
- **Resource limits**: CPU seconds (``ceil(timeout_s)``, SIGKILL a second later), address space
  (``memory_mb`` per process), file size (``file_mb``; Python sees EFBIG), processes
  (``max_processes``), the size of /tmp and /dev/shm (``tmp_mb`` each), 256 open files, no core
  dumps, no locked memory.
- **A wall-clock limit** of ``timeout_s + STARTUP_SLACK_S``, after which the parent SIGKILLs the
  launcher's process group, and with it the namespace's init and so the namespace.
- **An empty environment** and ``python -I``: no secrets from environment variables, no user or
  site packages, no .pth hooks; the standard library only.

The outcome is a ``SandboxResult`` whatever the program does. Where the machine refuses a
namespace (not root; a container without CAP_SYS_ADMIN or whose seccomp profile blocks
``unshare``), ``run_sandboxed`` raises ``SandboxUnavailable`` with the reason, unless
``allow_unisolated`` (the operator's ``GRPO_SANDBOX_ALLOW_UNISOLATED`` setting, passed down; this
module reads no environment) says to run with the limits, a scratch working directory and (as
root) the uid drop only.

Residual risks, not stopped here:

- The kernel is shared and there is no seccomp filter: a kernel bug reachable by an
  unprivileged process is reachable from the sandbox. gVisor or a microVM would be the next layer.
- Memory is limited per process, not in total: a run can hold up to ``max_processes *
  memory_mb`` plus 2 * ``tmp_mb``, and a worker runs several at once. A memory cgroup would bound
  the sum; none is used, because a worker cannot count on owning a writable cgroup. Give the
  worker's container a memory limit.
- CPU time is limited per process; the wall clock bounds the run and ``max_processes`` how many
  cores it can keep busy meanwhile.
- The program can read what the bind-mounted directories hold (OS libraries, the standard
  library) and learn the kernel version, the CPU count and the memory size.
- Without namespaces (``allow_unisolated``) the program sees the host's file system as an
  unprivileged user does, reaches the network, and a daemon it starts can outlive the run when
  the worker is not root.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from trainer.rewards.base import RewardError
from trainer.rewards.stop import StopSignal

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
ALLOW_UNISOLATED_ENV = "GRPO_SANDBOX_ALLOW_UNISOLATED"
STARTUP_SLACK_S = 2.0  # wall-clock allowance for starting two interpreters on a busy machine
UID_BASE, UID_COUNT = 0x6000_0000, 1 << 24
OUTPUT_LIMIT = 1 << 20  # bytes of stdout and of stderr kept (the last ones)
GONE_WAIT_S = 2.0


class SandboxError(RewardError):
    """The sandbox could not run the program at all (not: the program failed)."""


class SandboxUnavailable(SandboxError):
    """The machine does not allow the namespaces the sandbox needs, and running without them is not
    allowed."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # the program's exit status, -N when signal N ended it, None when timed out
    stdout: bytes
    stderr: bytes
    timed_out: bool
    isolated: bool  # False only when allowed to run without namespaces
    duration_s: float
    uid: int  # the unprivileged uid the program ran as (when the launcher ran as root)

    def describe(self) -> str:
        if self.timed_out:
            return "stopped at the wall-clock limit"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exited with status {self.returncode}"


def run_sandboxed(
    code: str,
    *,
    stdin: bytes = b"",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    file_mb: int = 10,
    tmp_mb: int = 64,
    max_processes: int = 16,
    network: bool = False,
    allow_unisolated: bool = False,
    stop: StopSignal | None = None,
) -> SandboxResult:
    """Run the Python source ``code`` with ``stdin`` in the sandbox; its outcome, whatever the code does.

    Raises SandboxUnavailable when the namespaces cannot be had (and ``allow_unisolated`` is
    false), SandboxError when the sandbox itself fails; never for what the program does.
    ``stop.stop()`` (from another thread) kills the run's process group at once, as the
    wall-clock limit does, and the call then raises ``ScoringStopped``.
    """
    if stop is not None:
        stop.check()
    python, prefix, hidden = _python_installation()
    scratch = Path(tempfile.mkdtemp(prefix="grpo-sandbox-"))
    try:
        (scratch / "code.py").write_text(code, encoding="utf-8")
        (scratch / "root").mkdir()
        (scratch / "work").mkdir()
        uid = UID_BASE + secrets.randbelow(UID_COUNT)
        config = {
            "code_path": str(scratch / "code.py"),
            "root": str(scratch / "root"),
            "workdir": str(scratch / "work"),
            "python": python,
            "python_prefix": prefix,
            "hidden_dirs": hidden,
            "uid": uid,
            "cpu_s": max(1, math.ceil(timeout_s)),
            "memory_bytes": memory_mb * 2**20,
            "file_bytes": file_mb * 2**20,
            "tmp_bytes": tmp_mb * 2**20,
            "max_processes": max_processes,
            "network": network,
            "allow_unisolated": allow_unisolated,
        }
        started = time.monotonic()
        with (
            open(scratch / "stdout", "w+b") as out,
            open(scratch / "stderr", "w+b") as err,
            open(scratch / "status", "w+b") as status,
        ):
            config["status_fd"] = status.fileno()
            timed_out, exit_status = _launch(config, stdin, out, err, timeout_s + STARTUP_SLACK_S, stop)
            duration = time.monotonic() - started
            entries = _read_status(status)
            if stop is not None:
                stop.check()  # killed from outside: its outcome is no result
            stdout, stderr = _tail(out), _tail(err)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if "unavailable" in entries:
        raise SandboxUnavailable(
            f"refusing to run code without a sandbox: {entries['unavailable']}. Run the worker as root (in a "
            "container: with CAP_SYS_ADMIN and a seccomp profile that allows unshare) so that it may create "
            f"mount, PID and network namespaces, or set {ALLOW_UNISOLATED_ENV}=1 to run code with resource "
            "limits only (unsafe: the code can then read the worker's files and reach the network)"
        )
    if "error" in entries:
        raise SandboxError(f"the sandbox failed: {entries['error']}")
    if "exit" in entries:
        returncode: int | None = entries["exit"]
    elif "signal" in entries:
        returncode = -entries["signal"]
    elif timed_out:
        returncode = None
    else:
        detail = stderr[-300:].decode("utf-8", "replace").strip()
        raise SandboxError(f"the sandbox failed (exit status {exit_status}): {detail}")
    return SandboxResult(
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        isolated=entries.get("isolated", False),
        duration_s=duration,
        uid=uid,
    )


def _launch(config: dict, stdin: bytes, out, err, wall_s: float, stop: StopSignal | None) -> tuple[bool, int]:
    """Run the launcher to completion, to ``wall_s`` or until ``stop``: (timed out, its exit status)."""
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            env={},
            cwd=config["workdir"],
            pass_fds=(config["status_fd"],),
            start_new_session=True,  # its own group, killed as a whole
        )
    except OSError as exc:
        raise SandboxError(f"could not start the sandbox: {exc}") from None
    timed_out = False
    try:
        with (
            stop.on_stop(lambda: os.killpg(process.pid, signal.SIGKILL))
            if stop is not None
            else nullcontext()
        ):
            process.communicate(stdin, timeout=wall_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and the namespace's init
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
    return timed_out, process.returncode


def _read_status(status) -> dict:
    status.seek(0)
    entries: dict = {}
    for line in status.read().decode("utf-8", "replace").splitlines():
        try:
            entries.update(json.loads(line))
        except ValueError:
            continue
    if "init" in entries:
        _wait_gone(entries["init"])
    return entries


def _wait_gone(pid: int) -> None:
    """Wait (briefly) until the namespace's init is dead: then so is every process it held."""
    deadline = time.monotonic() + GONE_WAIT_S
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


def _tail(file) -> bytes:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - OUTPUT_LIMIT))
    return file.read()


def _python_installation() -> tuple[str, str, list[str]]:
    """The real interpreter, the installation directory it lives in, and its site-packages (hidden)."""
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not python.startswith(prefix + os.sep):
        raise SandboxError(
            f"the interpreter {python} lies outside its installation {prefix}; the sandbox "
            "mounts only the installation"
        )
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    hidden = {os.path.realpath(sysconfig.get_path(name, vars=base)) for name in ("purelib", "platlib")}
    return python, prefix, sorted(path for path in hidden if path.startswith(prefix + os.sep))
