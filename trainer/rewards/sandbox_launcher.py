"""The trusted side of the sandbox: a script that ``sandbox.py`` runs as root, never imported by it.

    python -I -S sandbox_launcher.py '<config as JSON>'

It starts as root in the host's namespaces and, standard library only:

1. enters new mount, PID, IPC, UTS and (unless ``network``) network namespaces;
2. builds a minimal root on a tmpfs: the OS library directories and the Python installation
   bind-mounted read-only (its site-packages hidden), a made-up /etc, /dev/null, zero, random and
   urandom, the program at /sandbox/main.py, and small tmpfs owned by the sandbox user at /tmp
   and /dev/shm;
   the tmpfs is then made read-only, pivot_root'ed into and the host's tree detached;
3. forks the namespace's init (PID 1, still root, out of the program's reach), which forks the
   program: it chroots one level deeper (a chrooted process may not create user namespaces),
   takes its resource limits, empties the capability bounding set, becomes the unprivileged
   ``uid`` (so that RLIMIT_NPROC counts and binds it), sets no_new_privs, closes every other
   descriptor and execs ``python -I /sandbox/main.py`` with an empty environment in /tmp.

When the program ends, init writes its exit status to the status descriptor and exits; the
kernel then kills whatever the program left behind in the PID namespace. Killing the launcher's
process group (the parent does, at the wall-clock limit) kills init and so the whole namespace.

Status lines (JSON, one per line) on ``status_fd``: ``{"init": pid, "isolated": bool}`` once init
runs, then ``{"exit": code}`` or ``{"signal": number}``; or ``{"unavailable": reason}`` when the
machine refuses a namespace and ``allow_unisolated`` is false, or ``{"error": reason}``.

With ``allow_unisolated`` and no namespaces, the program still gets its limits, the scratch
directory as working directory and, when started as root, the unprivileged uid; nothing else.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
HOST_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")  # program and library directories
HOST_FILES = ("/etc/ld.so.cache",)
DEVICES = ("null", "zero", "random", "urandom")
SANDBOX_ROOT = "/fs"  # the program's root inside the pivoted tmpfs: one chroot deeper
PROGRAM = "/sandbox/main.py"

libc = ctypes.CDLL(None, use_errno=True)


class Refused(Exception):
    """The machine does not allow a namespace or mount the sandbox needs."""


def check(result: int, what: str) -> None:
    if result != 0:
        raise Refused(f"{what}: {os.strerror(ctypes.get_errno())}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    check(
        libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
        f"mount {target}",
    )


def bind(source: str, target: str, *, device: bool = False) -> None:
    """A read-only, nosuid (and, except for devices, nodev) view of ``source`` at ``target``."""
    mount(source, target, None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if device else MS_NODEV)
    mount(None, target, None, flags)


def write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as file:
        file.write(text)
    os.chmod(path, mode)


def build_root(config: dict, code: str) -> None:
    """Mount the sandbox's file system at config["root"] and pivot into it."""
    root = config["root"]
    fs = root + SANDBOX_ROOT
    uid = config["uid"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=755")
    os.makedirs(fs + "/etc")
    for path in sorted({*HOST_DIRS, config["python_prefix"]}):
        if not os.path.lexists(path) or any(path.startswith(d + "/") for d in HOST_DIRS if os.path.isdir(d)):
            continue
        if os.path.islink(path):  # /lib -> usr/lib on merged-/usr systems
            os.symlink(os.readlink(path), fs + path)
        else:
            os.makedirs(fs + path)
            bind(path, fs + path)
    for hidden in config["hidden_dirs"]:  # e.g. site-packages: stdlib only
        if os.path.isdir(fs + hidden):
            mount("tmpfs", fs + hidden, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=755")
    for path in HOST_FILES:
        if os.path.isfile(path):
            write(fs + path, "")
            bind(path, fs + path)
    os.makedirs(fs + "/dev")
    for name in DEVICES:
        write(fs + "/dev/" + name, "")
        bind("/dev/" + name, fs + "/dev/" + name, device=True)
    write(fs + "/etc/passwd", f"sandbox:x:{uid}:{uid}:sandbox:/tmp:/bin/false\n")
    write(fs + "/etc/group", f"sandbox:x:{uid}:\n")
    write(fs + "/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n")
    os.makedirs(fs + os.path.dirname(PROGRAM))
    write(fs + PROGRAM, code)
    for scratch in ("/tmp", "/dev/shm"):  # /dev/shm: multiprocessing's semaphores
        os.makedirs(fs + scratch)
        mount(
            "tmpfs",
            fs + scratch,
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            f"size={config['tmp_bytes']},nr_inodes=4096,mode=700,uid={uid},gid={uid}",
        )
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    check(libc.pivot_root(b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")


def enter_namespaces(config: dict, code: str) -> bool:
    """Enter the namespaces and the minimal root: True, or False when refused and allowed to go on."""
    flags = (
        CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (0 if config["network"] else CLONE_NEWNET)
    )
    try:
        if os.geteuid() != 0:
            raise Refused(
                f"the sandbox starts as root to build its namespaces, and this process runs as "
                f"uid {os.geteuid()}"
            )
        check(libc.unshare(flags), "unshare")
        build_root(config, code)
        check(libc.sethostname(b"sandbox", 7), "sethostname")
    except (Refused, OSError) as exc:
        if not config["allow_unisolated"]:
            report({"unavailable": str(exc)})
            sys.exit(1)
        return False
    return True


def drop_privileges(uid: int) -> None:
    """Empty the capability bounding set and become ``uid``: no capabilities, no way back."""
    for capability in range(64):  # past the kernel's last capability prctl fails harmlessly
        libc.prctl(
            PR_CAPBSET_DROP,
            ctypes.c_ulong(capability),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def start_program(config: dict, isolated: bool, code: str) -> None:
    """In the forked child: limits, identity, then exec the program. Never returns."""
    try:
        if isolated:
            os.chroot(SANDBOX_ROOT)
            os.chdir("/tmp")
            arguments = [PROGRAM]  # with site: exit() and quit(); site-packages is empty
        else:  # the scratch directory above the working directory stays closed to the sandbox's uid
            os.chdir(config["workdir"])
            if os.geteuid() == 0:
                os.chown(".", config["uid"], config["uid"])
            arguments = ["-S", "-c", code]  # no site: the host's site-packages and .pth files stay unread
        limits = {
            resource.RLIMIT_CPU: (config["cpu_s"], config["cpu_s"] + 1),
            resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
            resource.RLIMIT_FSIZE: (config["file_bytes"],) * 2,
            resource.RLIMIT_NOFILE: (256, 256),
            resource.RLIMIT_CORE: (0, 0),
            resource.RLIMIT_MEMLOCK: (0, 0),
            resource.RLIMIT_MSGQUEUE: (0, 0),
            resource.RLIMIT_NPROC: (config["max_processes"],) * 2,
        }
        for which, value in limits.items():
            resource.setrlimit(which, value)
        if os.geteuid() == 0:
            drop_privileges(config["uid"])
        check(
            libc.prctl(
                PR_SET_NO_NEW_PRIVS,
                ctypes.c_ulong(1),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
            ),
            "no_new_privs",
        )
        os.closerange(3, STATUS_FD)
        os.closerange(STATUS_FD + 1, 1 << 16)
        os.set_inheritable(STATUS_FD, False)  # open until the exec succeeds, to report if it fails
        python = config["python"]
        os.execve(python, [python, "-I", *arguments], {})
    except BaseException as exc:  # noqa: BLE001 - anything here is the sandbox's failure, not the program's
        hint = ""
        if isinstance(exc, PermissionError) and not isolated:
            hint = (
                " (without namespaces, the unprivileged sandbox user must be able to read the Python "
                "installation; install it where every user may read it)"
            )
        report({"error": f"cannot start the program: {exc}{hint}"})
    os._exit(125)


def run_init(config: dict, isolated: bool, code: str) -> None:
    """PID 1 of the sandbox: start the program, reap, report its status, exit. Never returns."""
    if isolated:
        libc.prctl(
            PR_SET_PDEATHSIG,
            ctypes.c_ulong(signal.SIGKILL),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    child = os.fork()
    if child == 0:
        start_program(config, isolated, code)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        report({"signal": os.WTERMSIG(status)})
    else:
        report({"exit": os.WEXITSTATUS(status)})
    if not isolated and os.geteuid() == 0:
        kill_user(config["uid"])
    os._exit(0)  # as PID 1, this kills everything left in the namespace


def kill_user(uid: int) -> None:
    """Without a PID namespace: kill every process the sandbox's uid still runs."""
    helper = os.fork()
    if helper == 0:
        os.setresuid(uid, uid, uid)
        for _ in range(3):
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal: its own
        os._exit(0)
    os.waitpid(helper, 0)


def report(entry: dict) -> None:
    os.write(STATUS_FD, (json.dumps(entry) + "\n").encode())


def main(config: dict) -> None:
    with open(config["code_path"], encoding="utf-8") as file:
        code = file.read()
    isolated = enter_namespaces(config, code)
    init = os.fork()  # with CLONE_NEWPID, the child is PID 1 of the new namespace
    if init == 0:
        run_init(config, isolated, code)
    report({"init": init, "isolated": isolated})
    os.waitpid(init, 0)


if __name__ == "__main__":
    CONFIG = json.loads(sys.argv[1])
    STATUS_FD = CONFIG["status_fd"]
    try:
        main(CONFIG)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises SandboxError
        report({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
