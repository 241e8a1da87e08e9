"""Run untrusted, model-written Python in a separate, resource-limited, isolated process.

    sandbox = Sandbox(SandboxConfig(timeout_s=5, memory_mb=512, max_workers=2))
    result = sandbox.run("print(input()[::-1])", stdin="abc")          # result.status == "passed"
    results = sandbox.run_many([SandboxJob(program) for program in programs])   # bounded worker pool
    print(sandbox.isolation_report().summary())

Nothing here runs model code in the trainer's process. Each run gets, in this order of layers:

- a fresh process tree: ``unshare --net --pid --fork --kill-child --mount-proc`` (as root; as another user the
  same behind ``--user --map-root-user`` when the kernel allows unprivileged user namespaces), then our own
  bootstrap as PID 1 of the new PID namespace. When PID 1 ends the kernel kills everything left in the
  namespace, so a daemonized or ``setsid`` child cannot outlive the run;
- no network: the new network namespace has only a loopback device, and it is down;
- a private mount namespace: every mount is read-only in its view, a fresh, size-capped tmpfs is the
  working directory, and /tmp, /var/tmp and /dev/shm are fresh tmpfs too, so nothing the program writes
  survives the run or lands outside it;
- an unprivileged user: as root, the program runs as a uid of its own, with no supplementary groups and
  ``no_new_privs`` set (setuid binaries give nothing). Root ignores RLIMIT_NPROC, so this drop is what makes
  the process limit bite; and since the kernel counts RLIMIT_NPROC per uid, each concurrent run gets its
  own uid from a pool (``run_as_uid`` .. ``run_as_uid + uid_pool_size - 1``, ids no account uses) shared by
  every process on the machine (a lock file per uid), so a fork bomb in one run cannot make ``fork`` fail in
  another, in this process or any other. Without root, the user namespace's root has
  every capability dropped instead (it could otherwise undo the mounts);
- no Unix-domain sockets: a seccomp filter makes ``socket(AF_UNIX, ...)``, datagram ``socketpair`` and
  io_uring fail with EPERM. A network namespace does not cover path-bound sockets (a read-only mount does
  not stop ``connect`` either), so without it the program could talk to any world-writable socket on the
  host (D-Bus, a container runtime, a database);
- resource limits: CPU seconds, address space, processes, file size, open files, no core dumps;
- ``python -I`` (isolated mode: no PYTHON* variables, no user site, no script dir on the path), a minimal
  environment (no inherited secrets or tokens), its own process group, killed as a whole on timeout;
- stdout and stderr capped: more than ``max_output_bytes`` on a stream kills the run.

Which layers are active is detected at start-up by running a probe program through the real launcher and
reading what it observes (its uid, its pid, the network interfaces it sees, ...): see ``isolation_report()``.
Without root and without user namespaces only the rlimits, the process group, ``-I`` and the minimal
environment remain. That is not a silent fallback: ``SandboxConfig.require`` (by default the network, PID
and mount namespaces and the Unix-socket filter, ``REQUIRED_LAYERS``) makes ``Sandbox()`` raise when one of
them is missing, naming it. ``allow_weak_isolation=True`` accepts the weaker sandbox on purpose; it is then
logged as a warning at construction and on every ``run`` / ``run_many``.

Statuses: ``passed`` (exit code 0), ``failed`` (non-zero exit: an exception, an assert, a syntax error),
``timeout`` (wall clock or CPU limit), ``memory`` (MemoryError under the address-space limit), ``killed`` (a
signal, or output over the cap) and ``error``: the sandbox itself could not run the program. Only ``error``
means "cannot judge"; the program cannot produce it (setup success is reported over a pipe it never sees).

Deliberate simplifications:
- no cgroup, and seccomp only for Unix sockets and io_uring: memory is bounded by RLIMIT_AS per process,
  processes by RLIMIT_NPROC per run (per uid: without root there is one uid, so concurrent runs share the
  budget);
- the file system stays readable where Unix permissions let any account read;
- one fresh interpreter per run (a few tens of ms), no fork server.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

logger = logging.getLogger(__name__)

# Exit code the bootstrap gives a program that died of MemoryError (the program could fake it; that only
# changes a failure into another failure).
EXIT_MEMORY = 125
# After the launcher exits, how long to keep reading pipes that leftover processes may still hold open.
_EXIT_GRACE_S = 0.2
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
_PROBE_TIMEOUT_S = 20.0
# The layers model-written code must not run without (unless SandboxConfig.allow_weak_isolation says so).
REQUIRED_LAYERS = ("network_namespace", "pid_namespace", "mount_namespace", "unix_socket_filter")


class Status(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    KILLED = "killed"


@dataclass
class SandboxConfig:
    """Limits and isolation for one sandboxed run; a ``Sandbox`` applies the same config to every run."""

    timeout_s: float = 10.0  # wall clock per run, start-up included
    cpu_s: int | None = None  # RLIMIT_CPU; None: ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS of the program
    max_output_bytes: int = 1 << 20  # per stream (stdout, stderr); more kills the run
    max_workers: int = 2  # runs in parallel in run_many
    max_processes: int = 32  # RLIMIT_NPROC per run (as root; without root concurrent runs share it)
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # size of each private tmpfs (working dir, /tmp, /var/tmp, /dev/shm)
    # As root: the first uid of the pool the runs take their uid from (one free uid per concurrent run).
    # The default range is far above the ids Debian hands out to accounts (and to subuid ranges).
    run_as_uid: int = 1_900_000_000
    uid_pool_size: int = 64
    run_as_gid: int = 65534  # nogroup
    python: str | None = None  # interpreter; None: sys.executable, else /usr/bin/python3 (see _pythons)
    tmp_dir: str | None = None  # where the per-run temp dirs go; None: tempfile.gettempdir()
    # Isolation layers that must be active, else Sandbox() raises: names as in IsolationReport.layers().
    require: tuple[str, ...] = REQUIRED_LAYERS
    # True: run even when a required layer is missing (logged as a warning on every run). Only on purpose.
    allow_weak_isolation: bool = False

    def __post_init__(self) -> None:
        positive = ("timeout_s", "memory_mb", "max_output_bytes", "max_workers", "max_processes")
        positive += ("max_file_mb", "max_open_files", "tmpfs_mb", "run_as_uid", "run_as_gid", "uid_pool_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive number, got {value!r}")
        if self.cpu_s is not None and (not isinstance(self.cpu_s, int) or self.cpu_s <= 0):
            raise ValueError(f"SandboxConfig.cpu_s must be a positive int or None, got {self.cpu_s!r}")
        if self.max_open_files < 16:
            raise ValueError("SandboxConfig.max_open_files below 16 leaves Python unable to start; use >= 16")
        if self.memory_mb < 64:
            raise ValueError("SandboxConfig.memory_mb below 64 leaves Python unable to start; use >= 64")
        if not all(isinstance(getattr(self, n), int) for n in ("run_as_uid", "run_as_gid", "uid_pool_size")):
            raise ValueError("SandboxConfig.run_as_uid, run_as_gid and uid_pool_size must be ints")
        if self.run_as_uid + self.uid_pool_size > 2**31:
            raise ValueError("SandboxConfig.run_as_uid + uid_pool_size must stay below 2**31")
        if not isinstance(self.allow_weak_isolation, bool):
            raise ValueError(
                f"SandboxConfig.allow_weak_isolation must be a bool, got {self.allow_weak_isolation!r}"
            )
        self.require = tuple(self.require)
        unknown = set(self.require) - set(IsolationReport.LAYERS)
        if unknown:
            raise ValueError(
                f"SandboxConfig.require has unknown layers {sorted(unknown)}; known: {IsolationReport.LAYERS}"
            )

    @property
    def cpu_limit_s(self) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass
class SandboxJob:
    program: str
    stdin: str | None = None
    timeout_s: float | None = None  # None: the config's


@dataclass
class SandboxResult:
    status: Status
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    returncode: int | None = None  # the program's exit code when it exited normally
    signal: str | None = None  # the signal that ended it, e.g. "SIGKILL"
    truncated: bool = False  # stdout or stderr was cut at max_output_bytes
    reason: str | None = None  # why, in words, for everything but passed/failed

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED


@dataclass
class IsolationReport:
    """What a probe program observed from inside the sandbox (not just what was asked for)."""

    LAYERS = (
        "network_namespace",
        "pid_namespace",
        "mount_namespace",
        "unix_socket_filter",
        "read_only_fs",
        "user_namespace",
        "uid_drop",
        "no_capabilities",
        "no_new_privs",
    )

    network_namespace: bool = False  # sees no interface but loopback
    pid_namespace: bool = False  # runs as PID 2 under our PID 1
    mount_namespace: bool = False  # private tmpfs for cwd and /tmp (the host /tmp marker is invisible)
    unix_socket_filter: bool = False  # socket(AF_UNIX) fails: no way to reach a socket file on the host
    read_only_fs: bool = False  # "/" is mounted read-only in its view
    user_namespace: bool = False  # non-root parent: namespaces through an unprivileged user namespace
    uid_drop: bool = False  # runs as a pool uid, so RLIMIT_NPROC is enforced
    no_capabilities: bool = False  # empty effective and permitted capability sets
    no_new_privs: bool = False  # setuid binaries and file capabilities give nothing
    launcher: list[str] = field(default_factory=list)
    python: str = ""
    python_version: str = ""
    uid: int = -1
    notes: list[str] = field(default_factory=list)

    def layers(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in self.LAYERS}

    def missing(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` that are not active."""
        return [n for n in names if not getattr(self, n)]

    def summary(self) -> str:
        on = [n for n, v in self.layers().items() if v]
        off = [n for n, v in self.layers().items() if not v]
        text = f"sandbox isolation: active {on or 'none'}; inactive {off or 'none'}; rlimits always; "
        text += f"python {self.python} ({self.python_version}) as uid {self.uid}"
        return text + "".join(f"; {n}" for n in self.notes)


# --------------------------------------------------------------------------------------------------------
# The bootstrap: these functions run inside the sandbox interpreter, not here. _bootstrap_source() sends
# their source with ``python -I -c``, so they import what they use and touch no module globals.
# --------------------------------------------------------------------------------------------------------


def _boot_main() -> None:
    """PID 1 of the sandbox: prepare the private mounts, fork the program, report how it ended."""
    import ctypes
    import json
    import os
    import sys

    params = json.loads(sys.argv[1])
    status_fd = params["status_fd"]
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with open(params["program_path"], encoding="utf-8") as f:
            source = f.read()
        stdin_fd = os.open(params["stdin_path"], os.O_RDONLY) if params["stdin_path"] else None
        if params["private_mounts"]:
            _boot_mount_private(libc, params)
        os.chdir(params["work_dir"])
    except Exception as e:  # noqa: BLE001 - any setup failure is reported, not raised
        os.write(status_fd, json.dumps({"setup_error": f"{type(e).__name__}: {e}"}).encode())
        os._exit(0)
    if stdin_fd is not None:
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        os.close(ready_r)
        _boot_child(libc, source, params, ready_w)  # raises SystemExit, never returns
    os.close(ready_w)
    ready = b""
    while chunk := os.read(ready_r, 4096):
        ready += chunk
    status = _boot_wait(pid, params["timeout_s"])
    if ready != b"ok":
        status = {"setup_error": ready.decode(errors="replace") or "the program process died during setup"}
    os.write(status_fd, json.dumps(status).encode())
    os._exit(0)


def _boot_mount_private(libc, params) -> None:
    """Make every mount read-only, then put fresh tmpfs on the shared writable dirs and on the working dir.

    We are root in a private mount namespace, so these changes are invisible outside it. A bind remount
    changes the flags of our view of a mount, not the file system; flags the parent namespace locked
    (nosuid, nodev, noexec, atime) must be kept or the kernel refuses, hence the table.
    """
    import ctypes
    import os

    ms_rdonly, ms_nosuid, ms_nodev, ms_remount, ms_bind = 1, 2, 4, 32, 4096
    keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split()[5]) for line in f]
    for target, options in mounts:
        flags = sum(keep.get(opt, 0) for opt in options.split(","))
        target = target.replace("\\040", " ")
        # Best effort per mount: one we cannot remount (a covered one, say) leaves the others read-only;
        # the probe reports whether "/" ended up read-only.
        libc.mount(None, target.encode(), None, ms_remount | ms_bind | ms_rdonly | flags, None)

    def mount_tmpfs(target: str, mode: int) -> None:
        opts = f"size={params['tmpfs_mb']}m,nr_inodes=16384,mode={mode:o}".encode()
        check(
            libc.mount(b"tmpfs", target.encode(), b"tmpfs", ms_nosuid | ms_nodev, opts),
            f"mount tmpfs on {target}",
        )

    for shared in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(shared) and not os.path.islink(shared):
            mount_tmpfs(shared, 0o1777)
    # The host work dir may now be hidden under the new /tmp: recreate its path, then cover it too.
    os.makedirs(params["work_dir"], exist_ok=True)
    mount_tmpfs(params["work_dir"], 0o700)
    if params["drop_uid"] is not None:
        os.chown(params["work_dir"], params["drop_uid"], params["drop_gid"])


def _boot_child(libc, source: str, params, ready_w: int) -> None:
    """The program's process: drop privileges, set limits, tell PID 1 setup worked, run the program."""
    import os
    import resource
    import sys
    import traceback
    import types

    try:
        if params["new_session"]:
            # Out of the launcher's process group: killpg(0) would otherwise reach the launcher, which
            # lives outside the PID namespace, and a killed launcher reads as a sandbox error.
            os.setsid()
        if params["drop_uid"] is not None:
            os.setgroups([])
            os.setgid(params["drop_gid"])
            os.setuid(params["drop_uid"])  # from root to another uid: the kernel clears all capabilities
        else:
            _boot_drop_capabilities(libc)
        pr_set_no_new_privs = 38
        if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
            raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")
        _boot_filter_unix_sockets(libc)  # best effort: the probe reports whether it is in force
        for name, soft, hard in params["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
    except Exception as e:  # noqa: BLE001
        os.write(ready_w, f"{type(e).__name__}: {e}".encode())
        os._exit(1)
    os.write(ready_w, b"ok")
    os.close(ready_w)

    # A fresh __main__ so the program sees neither the bootstrap nor its names; linecache holds the source,
    # so tracebacks show the lines without a readable file.
    import linecache

    main = types.ModuleType("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"] = main
    sys.argv = ["main.py"]
    linecache.cache["main.py"] = (len(source), None, source.splitlines(True), "main.py")
    try:
        exec(compile(source, "main.py", "exec"), main.__dict__)
        code = 0
    except SystemExit as e:
        code = e.code
    except MemoryError as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        code = 125
    except BaseException as e:  # noqa: BLE001 - print like the interpreter would, without our frame
        traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        code = 1
    sys.exit(code)


def _boot_drop_capabilities(libc) -> None:
    """Drop every capability, bounding set included.

    In a user namespace our program is uid 0 there, with all capabilities over its namespaces: it could
    unmount the private /tmp or remount "/" writable. Without root there is nothing to drop and the calls
    fail harmlessly (EPERM), so failures are ignored; the probe reports what is left.
    """
    import ctypes

    pr_capbset_drop = 24
    for cap in range(64):
        libc.prctl(pr_capbset_drop, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    linux_capability_version_3 = 0x20080522
    libc.capset(ctypes.byref(Header(linux_capability_version_3, 0)), (Data * 2)())


def _boot_filter_unix_sockets(libc) -> bool:
    """Install a seccomp filter: socket(AF_UNIX), non-stream socketpair and io_uring fail with EPERM.

    A path-bound Unix socket is reachable from any network namespace, and a read-only mount does not stop
    ``connect`` on it; only the socket file's mode does. Stream socketpairs stay allowed (asyncio's self-pipe);
    datagram ones could ``sendto`` any path, and io_uring could open and connect sockets past seccomp.
    Syscalls of another ABI (i386 ``socketcall``, x32) are refused as a whole. Returns False where the
    architecture is unknown or the kernel refuses the filter.
    """
    import ctypes
    import os

    # machine: (AUDIT_ARCH, __NR_socket, __NR_socketpair); io_uring_setup/enter/register are 425-427 on both.
    arches = {"x86_64": (0xC000003E, 41, 53), "aarch64": (0xC00000B7, 198, 199)}
    if os.uname().machine not in arches:
        return False
    arch, nr_socket, nr_socketpair = arches[os.uname().machine]
    ld_abs, jeq, jge, and_k, ret = 0x20, 0x15, 0x35, 0x54, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    af_unix, sock_stream, sock_type_mask = 1, 1, 0xF
    # (label, code, jump if true, jump if false, k) over struct seccomp_data {nr; arch; ip; args[6]}.
    program = [
        ("", ld_abs, 0, 0, 4),  # arch
        ("", jeq, 0, "deny", arch),
        ("", ld_abs, 0, 0, 0),  # syscall number
        ("", jge, "deny", 0, 0x40000000),  # the x32 ABI
        ("", jeq, "socket", 0, nr_socket),
        ("", jeq, "socketpair", 0, nr_socketpair),
        ("", jeq, "deny", 0, 425),
        ("", jeq, "deny", 0, 426),
        ("", jeq, "deny", 0, 427),
        ("", ret, 0, 0, allow),
        ("socket", ld_abs, 0, 0, 16),  # args[0], low 32 bits: the domain
        ("", jeq, "deny", "allow", af_unix),
        ("socketpair", ld_abs, 0, 0, 24),  # args[1]: the type, with SOCK_NONBLOCK / SOCK_CLOEXEC bits
        ("", and_k, 0, 0, sock_type_mask),
        ("", jeq, "allow", "deny", sock_stream),
        ("allow", ret, 0, 0, allow),
        ("deny", ret, 0, 0, deny),
    ]
    at = {label: i for i, (label, *_) in enumerate(program) if label}

    class Insn(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]

    def offset(target, i: int) -> int:
        return at[target] - i - 1 if isinstance(target, str) else target  # BPF jumps only go forward

    insns = (Insn * len(program))(
        *(Insn(code, offset(jt, i), offset(jf, i), k) for i, (_, code, jt, jf, k) in enumerate(program))
    )
    prog = Prog(len(program), insns)
    pr_set_seccomp, seccomp_mode_filter = 22, 2
    return libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(prog), 0, 0) == 0


def _boot_wait(pid: int, timeout_s: float) -> dict:
    """Wait for the program; a backstop alarm kills it should the parent be gone and unable to."""
    import math
    import os
    import signal

    def on_alarm(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(math.ceil(timeout_s) + 2)
    try:
        _, status = os.waitpid(pid, 0)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return {"timeout": True}
    signal.alarm(0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status)}


@functools.cache
def _bootstrap_source() -> str:
    functions = (
        _boot_main,
        _boot_mount_private,
        _boot_child,
        _boot_drop_capabilities,
        _boot_filter_unix_sockets,
        _boot_wait,
    )
    parts = [inspect.getsource(f) for f in functions]
    return "\n\n".join(parts) + "\n\n_boot_main()\n"


# --------------------------------------------------------------------------------------------------------
# Start-up detection: which launcher and interpreter work, and what isolation the program really gets.
# --------------------------------------------------------------------------------------------------------

_PROBE = """
import json, os, socket, sys
import collections, decimal, fractions, functools, hashlib, heapq, itertools, math, random, re, string
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
uid_map = open("/proc/self/uid_map").read().split()
try:
    socket.socket(socket.AF_UNIX).close()
    unix_refused = False
except PermissionError:
    unix_refused = True
print(json.dumps({
    "uid": os.getuid(), "pid": os.getpid(), "version": sys.version.split()[0],
    "interfaces": [name for _, name in socket.if_nameindex()],
    "no_new_privs": status.get("NoNewPrivs", "0").strip() == "1",
    "no_capabilities": int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0,
    "read_only_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
    "marker_visible": os.path.exists(MARKER),
    "host_uid_map": uid_map[:3] == ["0", "0", "4294967295"],
    "unix_refused": unix_refused,
}))
"""


@dataclass
class _Setup:
    launcher: list[str]
    python: str
    drop: bool  # drop to a pool uid in the program's process
    private_mounts: bool
    report: IsolationReport


_SETUP_CACHE: dict[tuple, _Setup] = {}
_SETUP_LOCK = threading.Lock()


def _find_unshare() -> str | None:
    """The namespace launcher (util-linux, which every Debian has), or None."""
    return shutil.which("unshare", path=_SYSTEM_PATH)


def _launchers(is_root: bool, unshare: str | None) -> list[list[str]]:
    """Strongest first."""
    if not unshare:
        return [[]]
    user = [] if is_root else ["--user", "--map-root-user"]
    full = [unshare, *user, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    return [full, [unshare, *user, "--net"], []]


def _pythons(config: SandboxConfig) -> list[str]:
    if config.python:
        return [config.python]
    # The trainer's interpreter first; a system one for when the sandbox user cannot read the trainer's
    # (e.g. a pyenv build under /root, mode 0700).
    found = [sys.executable, shutil.which("python3", path="/usr/bin:/bin")]
    return list(dict.fromkeys(p for p in found if p))


def _detect(config: SandboxConfig) -> _Setup:
    """Try launcher x interpreter combinations, strongest first; keep the first the probe program passes."""
    is_root = os.geteuid() == 0
    unshare = _find_unshare()
    key = (is_root, unshare, config.python, config.run_as_uid, config.uid_pool_size, config.run_as_gid)
    with _SETUP_LOCK:
        if key in _SETUP_CACHE:
            return _SETUP_CACHE[key]
        failures = []
        # A file in the host /tmp that a private mount namespace must hide.
        marker = tempfile.NamedTemporaryFile(
            prefix="sandbox-marker-", dir="/tmp" if os.path.isdir("/tmp") else None
        )
        with marker:
            probe = _PROBE.replace("MARKER", repr(marker.name))
            for launcher in _launchers(is_root, unshare):
                for python in _pythons(config):
                    setup = _Setup(launcher, python, is_root, "--mount-proc" in launcher, IsolationReport())
                    result = _run_job(config, setup, SandboxJob(probe, timeout_s=_PROBE_TIMEOUT_S))
                    if result.status is Status.PASSED:
                        setup.report = _read_probe(result.stdout, setup, config, failures)
                        _SETUP_CACHE[key] = setup
                        logger.info(setup.report.summary())
                        return setup
                    why = (result.reason or result.stderr).strip().splitlines() or ["?"]
                    failures.append(
                        f"{' '.join(launcher) or 'no launcher'} + {python}: {result.status}, {why[-1]}"
                    )
        raise RuntimeError("no way to run the sandbox worked here:\n  " + "\n  ".join(failures))


def _read_probe(stdout: str, setup: _Setup, config: SandboxConfig, failures: list[str]) -> IsolationReport:
    seen = json.loads(stdout)
    report = IsolationReport(
        network_namespace="--net" in setup.launcher and set(seen["interfaces"]) <= {"lo"},
        pid_namespace="--pid" in setup.launcher and seen["pid"] == 2,
        mount_namespace=setup.private_mounts and not seen["marker_visible"],
        unix_socket_filter=seen["unix_refused"],
        user_namespace="--user" in setup.launcher and not seen["host_uid_map"],
        uid_drop=setup.drop and config.run_as_uid <= seen["uid"] < config.run_as_uid + config.uid_pool_size,
        no_new_privs=seen["no_new_privs"],
        no_capabilities=seen["no_capabilities"],
        read_only_fs=seen["read_only_root"],
        launcher=setup.launcher,
        python=setup.python,
        python_version=seen["version"],
        uid=seen["uid"],
        notes=[f"not used: {f}" for f in failures],
    )
    if setup.drop:
        report.notes.append("user_namespace not needed: the parent is root")
        report.notes.append(
            f"one uid per concurrent run from {config.run_as_uid} (pool of {config.uid_pool_size})"
        )
    elif not report.uid_drop:
        report.notes.append("not root: no uid drop; the program's processes count against this user's")
    return report


# --------------------------------------------------------------------------------------------------------
# One run, seen from the parent.
# --------------------------------------------------------------------------------------------------------


def _rlimits(config: SandboxConfig, setup: _Setup) -> list[tuple[str, int, int]]:
    nproc = config.max_processes
    if not setup.drop and "--user" not in setup.launcher:
        # Same uid as the trainer, no user namespace: the count includes every task this user runs already.
        nproc += _count_tasks(os.getuid())
    cpu = config.cpu_limit_s
    mb = 1 << 20
    return [
        ("RLIMIT_CPU", cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        ("RLIMIT_AS", config.memory_mb * mb, config.memory_mb * mb),
        ("RLIMIT_NPROC", nproc, nproc),
        ("RLIMIT_FSIZE", config.max_file_mb * mb, config.max_file_mb * mb),
        ("RLIMIT_NOFILE", config.max_open_files, config.max_open_files),
        ("RLIMIT_CORE", 0, 0),
    ]


def _count_tasks(uid: int) -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid:
            count += int(fields["Threads"])
    return count


def _make_dirs(config: SandboxConfig, job: SandboxJob, uid: int | None) -> tuple[str, str, str | None, str]:
    """Host side: <tmp>/sandbox-XXXX/{program.py, stdin.txt, work/}. Returns (root, program, stdin, work)."""
    root = tempfile.mkdtemp(prefix="sandbox-", dir=config.tmp_dir)
    program_path = os.path.join(root, "program.py")
    with open(os.open(program_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
        f.write(job.program)
    stdin_path = None
    if job.stdin is not None:
        stdin_path = os.path.join(root, "stdin.txt")
        with open(
            os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8"
        ) as f:
            f.write(job.stdin)
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    if uid is not None:
        # Without a private mount this host dir is the working dir itself; traversable, not listable.
        os.chmod(root, 0o711)
        os.chown(work, uid, config.run_as_gid)
    return root, program_path, stdin_path, work


class _UidPool:
    """Hands each concurrent run a uid no other run holds, on this whole machine.

    Within the process a condition guards the set of busy uids (the worker threads of ``run_many`` and every
    ``Sandbox`` instance share it). Across processes (two trainers of a data-parallel launch, a test suite on
    two workers, two users' jobs as root) each held uid is also an exclusive ``flock`` on its own file in
    ``lock_dir``, taken without blocking and held for the run; the kernel drops it when the holder exits,
    even by SIGKILL. A per-process pool alone would hand the same first uid to every process, so their runs
    would share one RLIMIT_NPROC budget and a fork bomb in one could make ``fork`` fail in another.
    """

    def __init__(self, lock_dir: str | os.PathLike | None = None) -> None:
        self._busy: dict[int, int] = {}  # uid -> the fd holding its lock
        self._cond = threading.Condition()
        self._lock_dir = lock_dir

    def _dir(self) -> str:
        path = os.fspath(self._lock_dir or os.path.join(tempfile.gettempdir(), "alignment-sandbox-uids"))
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"sandbox: cannot create the uid lock folder {path}: {e}") from e
        return path

    def _try_lock(self, folder: str, uid: int) -> int | None:
        import fcntl

        fd = os.open(os.path.join(folder, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def acquire(self, first: int, size: int) -> int:
        folder = self._dir()
        with self._cond:
            while True:
                for uid in range(first, first + size):
                    if uid not in self._busy and (fd := self._try_lock(folder, uid)) is not None:
                        self._busy[uid] = fd
                        return uid
                # Every uid is held, here or by another process (which cannot notify us): look again soon.
                self._cond.wait(timeout=0.05)

    def release(self, uid: int) -> None:
        with self._cond:
            fd = self._busy.pop(uid, None)
            if fd is not None:
                os.close(
                    fd
                )  # drops the flock (a child forked meanwhile closes its copy: O_CLOEXEC, close_fds)
            self._cond.notify()


_UIDS = _UidPool()


def _check_uid_pool(config: SandboxConfig) -> None:
    """Refuse a pool that overlaps an account: the program could then touch that account's files."""
    for uid in range(config.run_as_uid, config.run_as_uid + config.uid_pool_size):
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            continue
        if name != "nobody":
            raise ValueError(
                f"SandboxConfig: uid {uid} of the sandbox pool belongs to the account {name!r}; "
                "set run_as_uid to a range no account uses (the default starts at 1900000000)"
            )


def _run_job(config: SandboxConfig, setup: _Setup, job: SandboxJob) -> SandboxResult:
    """Run one job as a uid of the pool (as root); any failure of ours becomes status ``error``."""
    uid = _UIDS.acquire(config.run_as_uid, config.uid_pool_size) if setup.drop else None
    try:
        return _run_as(config, setup, job, uid)
    finally:
        if uid is not None:
            _UIDS.release(uid)


def _run_as(config: SandboxConfig, setup: _Setup, job: SandboxJob, uid: int | None) -> SandboxResult:
    start = time.monotonic()
    timeout_s = job.timeout_s if job.timeout_s is not None else config.timeout_s
    root = None
    try:
        root, program_path, stdin_path, work = _make_dirs(config, job, uid)
        status_r, status_w = os.pipe()
        params = {
            "status_fd": status_w,
            "program_path": program_path,
            "stdin_path": stdin_path,
            "work_dir": work,
            "private_mounts": setup.private_mounts,
            "new_session": "--pid" in setup.launcher,
            "tmpfs_mb": config.tmpfs_mb,
            "drop_uid": uid,
            "drop_gid": config.run_as_gid if uid is not None else None,
            "rlimits": _rlimits(config, setup),
            "timeout_s": timeout_s,
            "env": {
                "PATH": _SYSTEM_PATH,
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "HOME": work,
                "TMPDIR": "/tmp",
            },
        }
        cmd = [*setup.launcher, setup.python, "-I", "-c", _bootstrap_source(), json.dumps(params)]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w,),
                env=params["env"],
                cwd=root,
                process_group=0,  # its own group, so one killpg ends the launcher and what it started
            )
        finally:
            os.close(status_w)
        with proc, open(status_r, "rb", buffering=0) as status_file:
            outcome = _collect(proc, status_file, start + timeout_s, config.max_output_bytes)
        return _classify(outcome, time.monotonic() - start, config)
    except Exception as e:  # noqa: BLE001 - the trainer must never see an exception from a run
        logger.exception("sandbox run failed")
        return SandboxResult(
            Status.ERROR, duration_s=time.monotonic() - start, reason=f"{type(e).__name__}: {e}"
        )
    finally:
        if root is not None:
            _remove_tree(root)


@dataclass
class _Outcome:
    stdout: bytes
    stderr: bytes
    status: dict | None  # what PID 1 reported, None if nothing
    stopped: str | None  # "timeout" or "output on stdout/stderr" when we killed it
    truncated: bool
    launcher_returncode: int  # negative: killed by that signal


def _collect(proc: subprocess.Popen, status_file, deadline: float, cap: int) -> _Outcome:
    """Read stdout, stderr and the status pipe until EOF, the deadline, or a stream over the cap."""
    names = {proc.stdout: "stdout", proc.stderr: "stderr", status_file: "status"}
    bufs = {name: bytearray() for name in names.values()}
    sel = selectors.DefaultSelector()
    for f in names:
        sel.register(f, selectors.EVENT_READ)
    stopped, exited_at = None, None
    while sel.get_map() and stopped is None:
        now = time.monotonic()
        if now >= deadline:
            stopped = "timeout"
            break
        if exited_at is None and _has_exited(proc.pid):
            exited_at = now
        if exited_at is not None and now - exited_at > _EXIT_GRACE_S:
            break  # only leftovers (no PID namespace) still hold the pipes: stop reading, killpg below
        for key, _ in sel.select(timeout=min(deadline - now, 0.1)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            name = names[key.fileobj]
            bufs[name] += chunk
            if name != "status" and len(bufs[name]) > cap:
                stopped = f"output on {name}"
    sel.close()
    _kill_run(proc.pid)
    launcher_returncode = proc.wait()
    try:
        status = json.loads(bufs["status"]) if bufs["status"] else None
    except ValueError:
        status = None
    truncated = len(bufs["stdout"]) > cap or len(bufs["stderr"]) > cap
    stdout, stderr = bytes(bufs["stdout"][:cap]), bytes(bufs["stderr"][:cap])
    return _Outcome(stdout, stderr, status, stopped, truncated, launcher_returncode)


def _kill_run(pid: int) -> None:
    """Kill what is left of a run: the launcher's children first, then its whole process group.

    Killing the sandbox's PID 1 while the launcher (unshare) still lives lets the launcher reap it; killed
    the other way round, PID 1 would be handed to the system's init and linger as a zombie until reaped.
    The group is killed before the launcher is reaped, so its pid (= the group id) cannot have been reused.
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 0.5
    while children and not _has_exited(pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _has_exited(pid: int) -> bool:
    """True once the launcher has exited, without reaping it (WNOWAIT)."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _classify(out: _Outcome, duration_s: float, config: SandboxConfig) -> SandboxResult:
    result = SandboxResult(
        Status.ERROR,
        stdout=out.stdout.decode("utf-8", errors="replace"),
        stderr=out.stderr.decode("utf-8", errors="replace"),
        duration_s=duration_s,
        truncated=out.truncated,
    )
    status = out.status or {}
    if out.stopped == "timeout" or status.get("timeout"):
        result.status, result.reason = Status.TIMEOUT, f"wall clock over {config.timeout_s:g} s"
    elif out.stopped:
        result.status, result.signal = Status.KILLED, "SIGKILL"
        result.reason = f"{out.stopped} over {config.max_output_bytes} bytes"
    elif "setup_error" in status:
        result.reason = f"sandbox setup failed: {status['setup_error']}"
    elif "signal" in status:
        sig = signal.Signals(status["signal"])
        result.signal = sig.name
        if sig is signal.SIGXCPU:
            result.status, result.reason = Status.TIMEOUT, f"CPU time over {config.cpu_limit_s} s"
        else:
            result.status, result.reason = Status.KILLED, f"killed by {sig.name}"
    elif "exit" in status:
        result.returncode = status["exit"]
        if result.returncode == 0:
            result.status = Status.PASSED
        elif result.returncode == EXIT_MEMORY:
            result.status, result.reason = Status.MEMORY, f"MemoryError under a {config.memory_mb} MB limit"
        else:
            result.status = Status.FAILED
    elif out.launcher_returncode < 0:
        # Without a PID namespace the program can kill its launcher; a killed launcher must not read as
        # "cannot judge" (error), or killing it would be a way out of a bad score.
        result.status, result.signal = Status.KILLED, signal.Signals(-out.launcher_returncode).name
        result.reason = f"the sandbox process was killed by {result.signal}"
    else:
        result.reason = f"the sandbox ended without a status: {result.stderr.strip()[-500:]}"
    return result


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(func, p, _exc):
        # The program may have left dirs without write or search permission for us (non-root case).
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
        func(p)

    try:
        shutil.rmtree(path, onerror=make_writable_and_retry)
    except OSError as e:
        logger.warning("could not remove sandbox temp dir %s: %s", path, e)


# --------------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------------


class Sandbox:
    """Runs programs in the sandbox, one at a time (``run``) or on a bounded pool of workers (``run_many``).

    Construction detects the isolation once per process and configuration (a few probe runs, well under a
    second) and raises if a layer named in ``config.require`` is missing, unless
    ``config.allow_weak_isolation``: then every construction and every run logs a warning naming the layers.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        if os.geteuid() == 0:
            _check_uid_pool(self.config)
        self._setup = _detect(self.config)
        self.missing_layers = self._setup.report.missing(self.config.require)
        if self.missing_layers and not self.config.allow_weak_isolation:
            raise RuntimeError(
                f"sandbox isolation layer(s) {', '.join(self.missing_layers)} required but not active here "
                f"({self._setup.report.summary()}). Run as root or allow unprivileged user namespaces "
                "(sysctl user.max_user_namespaces > 0; on Debian also kernel.unprivileged_userns_clone=1); "
                "or accept the weaker sandbox on purpose with SandboxConfig(allow_weak_isolation=True) "
                "(the code and verifier rewards: the param allow_weak_isolation: true)"
            )
        self._warn_weak()

    def _warn_weak(self) -> None:
        if self.missing_layers:
            logger.warning(
                "WEAK SANDBOX: model-written code runs without %s (allow_weak_isolation=True); %s",
                ", ".join(self.missing_layers),
                self._setup.report.summary(),
            )

    def isolation_report(self) -> IsolationReport:
        return self._setup.report

    def run(self, program: str, stdin: str | None = None, timeout_s: float | None = None) -> SandboxResult:
        if not isinstance(program, str):
            raise TypeError(f"Sandbox.run takes the program as a str, got {type(program).__name__}")
        self._warn_weak()
        return _run_job(self.config, self._setup, SandboxJob(program, stdin, timeout_s))

    def run_many(self, jobs: Sequence[SandboxJob | str]) -> list[SandboxResult]:
        """Results in the order of ``jobs``; at most ``config.max_workers`` run at once."""
        jobs = [SandboxJob(j) if isinstance(j, str) else j for j in jobs]
        for i, job in enumerate(jobs):
            if not isinstance(job, SandboxJob) or not isinstance(job.program, str):
                raise TypeError(
                    f"Sandbox.run_many: job {i} must be a SandboxJob or a program str, got {job!r:.80}"
                )
        if not jobs:
            return []
        self._warn_weak()
        workers = min(self.config.max_workers, len(jobs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(lambda job: _run_job(self.config, self._setup, job), jobs))


def isolation_report(config: SandboxConfig | None = None) -> IsolationReport:
    """The isolation a ``Sandbox`` with this config gets on this machine (detected once, then cached)."""
    return _detect(config or SandboxConfig()).report
