"""The code sandbox under attack: each escape is refused, reported, and leaves no process behind.

Each attack is checked twice: at the reward (a program whose test passes only if the escape
worked scores 0, without a counted error) and at ``run_sandboxed`` (the refusal is the expected
one, so that a 0 is not the result of some unrelated crash). An autouse fixture checks after
every test that no process of any sandbox uid the test used is still alive.
"""

import errno
import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from tests.trainer.factories import LOADED_MACHINE_SLACK_S
from trainer.config import OperatorPolicy
from trainer.rewards import RewardSuite, code_tests, sandbox
from trainer.rewards.sandbox import SandboxUnavailable, run_sandboxed

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the sandbox starts as root to build its namespaces"
)

UIDS: list[int] = []


def alive_uids(uids: set[int]) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            uid = int(fields["Uid"].split()[0])
            if uid in uids and not fields["State"].strip().startswith(("Z", "X")):  # dead, not yet reaped
                found.add(uid)
    return found


@pytest.fixture(autouse=True)
def no_process_outlives_a_run(monkeypatch):
    """Records the uid of every run of the test and checks afterwards that none still runs a process."""
    UIDS.clear()
    real = sandbox.run_sandboxed

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        UIDS.append(result.uid)
        return result

    monkeypatch.setattr(code_tests, "run_sandboxed", recording)
    yield
    assert UIDS, "the test ran no sandbox"
    assert alive_uids(set(UIDS)) == set()


def run(code: str, **options) -> sandbox.SandboxResult:
    options.setdefault("timeout_s", 2)
    result = run_sandboxed(textwrap.dedent(code), **options)
    UIDS.append(result.uid)
    return result


def printed(code: str, **options) -> str:
    result = run(code, **options)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def reward(
    program: str, tests: list[str], policy: OperatorPolicy | None = None, **spec
) -> tuple[list, dict, list[str]]:
    with RewardSuite([{"type": "code_tests", **spec}], policy=policy) as suite:
        output = suite([""], [textwrap.dedent(program)], [{"tests": tests}])
    return output.parts["code_tests"], output.errors, output.error_messages


def outcome(expression: str) -> str:
    """A program that prints what evaluating ``expression`` gave or raised."""
    return f"""
        import errno, os, socket
        try:
            print("ok", repr({expression})[:200])
        except BaseException as exc:
            print(type(exc).__name__, errno.errorcode.get(getattr(exc, "errno", None) or 0, ""))
    """


# --- a correct program, and the file system --------------------------------------------------------


def test_a_correct_solution_still_scores_one():
    assert reward("def add(a, b):\n    return a + b", ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]) == (
        [1.0],
        {"code_tests": 0},
        [],
    )


def test_etc_passwd_is_not_the_hosts():
    assert "root:" in Path("/etc/passwd").read_text()  # the host's has root; the sandbox's does not
    assert reward("data = open('/etc/passwd').read()", ["assert 'root:' in data"]) == (
        [0.0],
        {"code_tests": 0},
        [],
    )
    passwd = printed("print(open('/etc/passwd').read())")
    assert passwd.startswith("sandbox:x:") and "root" not in passwd


def test_the_projects_files_and_a_sentinel_outside_are_out_of_sight(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("secret")
    paths = [str(sentinel), str(REPO_ROOT / "pyproject.toml"), "/root/.bashrc", "/var/lib/postgresql"]
    program = f"import os\nfound = [p for p in {paths!r} if os.path.exists(p)]"
    assert reward(program, ["assert found"]) == ([0.0], {"code_tests": 0}, [])
    assert printed(outcome(f"open({str(sentinel)!r}).read()")) == "FileNotFoundError ENOENT"
    assert printed(outcome(f"os.listdir({str(REPO_ROOT)!r})")) == "FileNotFoundError ENOENT"
    assert (
        printed(outcome("sorted(os.listdir('/'))"))
        == "ok ['bin', 'dev', 'etc', 'lib', 'lib64', 'root', 'sandbox', 'sbin', 'tmp', 'usr']"
    )


def test_writes_go_only_to_a_private_tmp():
    assert printed(outcome("open('/usr/evil', 'w')")) == "OSError EROFS"
    assert printed(outcome("open('/etc/passwd', 'a')")) == "OSError EROFS"
    assert printed(outcome("(os.getcwd(), open('/tmp/x', 'w').write('hi'))")) == "ok ('/tmp', 2)"


def test_the_program_runs_unprivileged_with_an_empty_environment():
    assert printed(outcome(f"os.getuid() >= {sandbox.UID_BASE}")) == "ok True"
    assert printed(outcome("os.setuid(0)")) == "PermissionError EPERM"
    assert (
        printed(outcome("sorted(dict(os.environ).keys() - {'LC_CTYPE'})")) == "ok []"
    )  # LC_CTYPE: Python's own
    user_namespace = "__import__('ctypes').CDLL(None, use_errno=True).unshare(0x10000000)"
    assert printed(outcome(user_namespace)) == "ok -1"  # a chrooted process may not create one


# --- network -----------------------------------------------------------------------------------


def test_no_tcp_even_to_the_hosts_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()"
        assert reward(program, ["assert True"]) == ([0.0], {"code_tests": 0}, [])
        assert (
            printed(outcome(f"socket.create_connection(('127.0.0.1', {port}), timeout=1)"))
            == "OSError ENETUNREACH"
        )
        # The operator may allow the network; then the same program connects: the checks above are
        # not vacuous.
        networked = OperatorPolicy(sandbox_allow_network=True)
        assert reward(program, ["assert True"], networked, allow_network=True) == (
            [1.0],
            {"code_tests": 0},
            [],
        )


def test_no_udp():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(0.2)
        port = receiver.getsockname()[1]
        send = f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'leak', ('127.0.0.1', {port}))"
        assert reward(f"import socket\nsent = {send}", ["assert sent == 4"]) == ([0.0], {"code_tests": 0}, [])
        assert printed(outcome(send)) == "OSError ENETUNREACH"
        with pytest.raises(TimeoutError):
            receiver.recv(16)


def test_allow_network_needs_the_operators_consent(monkeypatch):
    monkeypatch.setenv(
        code_tests.ALLOW_NETWORK_ENV, "1"
    )  # read by the service's settings, not by the trainer
    with pytest.raises(ValueError, match="GRPO_SANDBOX_ALLOW_NETWORK=1") as refused:
        RewardSuite([{"type": "code_tests", "allow_network": True}])
    assert refused.value.param == "reward[0].allow_network"
    UIDS.append(-1)  # no sandbox ran; nothing to check


# --- resources ---------------------------------------------------------------------------------


FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def test_a_fork_bomb_and_a_sleeper_are_stopped_by_the_wall_clock():
    started = time.monotonic()
    with RewardSuite([{"type": "code_tests", "timeout_s": 0.5}]) as suite:
        output = suite(
            ["", ""], [FORK_BOMB, "import time\ntime.sleep(10**6)"], [{"tests": ["assert True"]}] * 2
        )
    assert output.parts["code_tests"] == [0.0, 0.0] and output.errors == {"code_tests": 0}
    assert (
        time.monotonic() - started < 0.5 + sandbox.STARTUP_SLACK_S + LOADED_MACHINE_SLACK_S
    )  # a 10**6 s sleep was cut
    assert len(UIDS) == 2  # and the fixture checks that none of their processes is left


def test_forks_are_capped_by_the_process_limit():
    code = """
        import os, time
        children = 0
        while True:
            try:
                pid = os.fork()
            except OSError as exc:
                print(children, exc.errno)
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
    """
    result = run(code, max_processes=5)
    assert result.returncode == 0 and result.stdout.split() == [b"4", str(errno.EAGAIN).encode()]


def test_ten_gigabytes_are_refused():
    assert reward("x = bytearray(10 * 2**30)", ["assert len(x) == 10 * 2**30"]) == (
        [0.0],
        {"code_tests": 0},
        [],
    )
    assert printed(outcome("len(bytearray(10 * 2**30))")) == "MemoryError"


def test_a_one_gigabyte_file_is_refused():
    program = """
        import errno
        written = 0
        try:
            with open("big", "wb") as file:
                for _ in range(1024):
                    written += file.write(b"x" * 2**20)
        except OSError as exc:
            print(errno.errorcode[exc.errno], written // 2**20)
    """
    assert reward(program, ["assert written == 2**30"]) == ([0.0], {"code_tests": 0}, [])
    assert printed(program, file_mb=3) == "EFBIG 3"


def test_a_forged_result_line_is_ignored():
    program = (
        "import sys\nfor n in range(5):\n    print('0' * 32, 3, 3)\n    sys.__stdout__.write('x 3 3\\n')"
    )
    assert reward(program, ["assert False"]) == ([0.0], {"code_tests": 0}, [])


def test_background_processes_die_with_the_run():
    code = """
        import os, subprocess, sys
        if os.fork() == 0:
            os.setsid()
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
            os._exit(0)
        os.wait()
        print("started")
    """
    result = run(code)
    assert result.stdout.strip() == b"started"
    # The autouse fixture asserts that the detached sleeper died with the namespace.


# --- machines without namespaces -----------------------------------------------------------------


NO_UNSHARE_LAUNCHER = """
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("launcher", {launcher!r})
launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launcher)


class NoUnshare:
    def __init__(self, libc):
        self.libc = libc

    def __getattr__(self, name):
        return getattr(self.libc, name)

    def unshare(self, flags):
        ctypes.set_errno(1)
        return -1


launcher.libc = NoUnshare(launcher.libc)
config = json.loads(sys.argv[1])
launcher.STATUS_FD = config["status_fd"]
launcher.main(config)
"""


@pytest.fixture
def no_namespaces(tmp_path, monkeypatch):
    """The real launcher on a machine that refuses unshare (EPERM)."""
    script = tmp_path / "launcher.py"
    script.write_text(NO_UNSHARE_LAUNCHER.format(launcher=str(sandbox.LAUNCHER)))
    monkeypatch.setattr(sandbox, "LAUNCHER", script)
    monkeypatch.setenv(
        sandbox.ALLOW_UNISOLATED_ENV, "1"
    )  # read by the service's settings, not by the trainer


def test_without_namespaces_code_rewards_are_refused_with_the_reason(no_namespaces):
    with pytest.raises(SandboxUnavailable, match="unshare: Operation not permitted") as caught:
        run_sandboxed("print(1)", timeout_s=1)
    assert f"{sandbox.ALLOW_UNISOLATED_ENV}=1" in str(caught.value)
    with RewardSuite([{"type": "code_tests"}]) as suite:
        output = suite(["", ""], ["def f(): pass"] * 2, [{"tests": ["assert True"]}] * 2)
    assert output.errors == {"code_tests": 2}
    (message,) = output.error_messages
    assert message.startswith(
        "code_tests: refusing to run code without a sandbox: unshare: Operation not permitted"
    )
    UIDS.append(-1)


def test_without_namespaces_the_operator_may_allow_limits_only(no_namespaces, monkeypatch):
    code = """
        import os, subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        print(os.getuid() != 0, os.path.basename(os.getcwd()), len(bytearray(10)))
    """
    python = sandbox._python_installation()[0]
    if not readable_by_all(python):  # here no namespace can hide /root: the uid cannot reach the interpreter
        with pytest.raises(sandbox.SandboxError, match="must be able to read the Python installation"):
            run(code, allow_unisolated=True)
        python = "/usr/bin/python3"
        if not readable_by_all(python):
            return
        monkeypatch.setattr(sandbox, "_python_installation", lambda: (python, "/usr", []))
    result = run(code, allow_unisolated=True)
    assert not result.isolated and result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"True", b"work", b"10"]
    assert printed(outcome("bytearray(10 * 2**30)"), allow_unisolated=True) == "MemoryError"


def readable_by_all(path: str) -> bool:
    """Whether every directory above ``path`` lets others in (so that an unprivileged uid can run it)."""
    parents = Path(path).parents
    return os.path.exists(path) and all(parent.stat().st_mode & 0o001 for parent in parents)
