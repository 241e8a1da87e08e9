"""The sandbox: statuses, limits, and every break-out attempt the issue lists, each contained without leaks.

Every test runs with small limits (2 s, 256 MB, 16 processes) so a bomb stays a small bomb on a 2-core
machine. After each test the ``no_leaks`` fixture checks that the per-run temp dirs are gone and that the
sandbox user runs no process it did not run before.

The fixtures build the sandbox with its defaults, which refuse to start without the network, PID and mount
namespaces and the Unix-socket filter: on a machine without them these tests fail, they do not skip. Tests
of a layer that is optional (the uid drop needs root) skip, naming the layer.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import reward.sandbox as sandbox_module
from reward.code_reward import CodeReward
from reward.sandbox import REQUIRED_LAYERS, Sandbox, SandboxConfig, SandboxJob, Status, isolation_report
from reward.verifier import VerifierReward

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0


def _pids_of_uids(uids: range) -> set[int]:
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid in uids:
                pids.add(int(pid))
        except OSError:
            pass
    return pids


def _pids_with_arg(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def tmp_root(tmp_path) -> Path:
    root = tmp_path / "sandbox-runs"
    root.mkdir()
    return root


@pytest.fixture
def config(tmp_root) -> SandboxConfig:
    return SandboxConfig(
        timeout_s=2.0,
        memory_mb=256,
        max_output_bytes=64_000,
        max_workers=2,
        max_processes=16,
        tmp_dir=str(tmp_root),
    )


@pytest.fixture
def sandbox(config) -> Sandbox:
    return Sandbox(config)


@pytest.fixture(autouse=True)
def no_leaks(request, tmp_path):
    """After each test: no per-run temp dir left, no new process of a sandbox uid still alive."""
    defaults = SandboxConfig()
    uids = range(defaults.run_as_uid, defaults.run_as_uid + defaults.uid_pool_size)
    before = _pids_of_uids(uids) if IS_ROOT else set()
    yield
    root = tmp_path / "sandbox-runs"
    if root.exists():
        assert list(root.iterdir()) == [], "a sandbox temp dir was not removed"
    if IS_ROOT:
        deadline = time.monotonic() + 2.0
        while (left := _pids_of_uids(uids) - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"processes of sandbox uids outlived the run: {left}"


def _report():
    return isolation_report()


def _needs(*layers: str) -> None:
    """Skip, naming the layer, when the test is about a layer this machine does not give the sandbox."""
    missing = _report().missing(layers)
    if missing:
        pytest.skip(f"sandbox layer {', '.join(missing)} inactive here: {_report().summary()}")


# ---------------------------------------------------------------- statuses


def test_passed_with_stdin_and_output(sandbox):
    result = sandbox.run("name = input()\nprint('hello', name[::-1])", stdin="abc\n")
    assert result.status is Status.PASSED, result
    assert result.stdout == "hello cba\n"
    assert result.returncode == 0 and result.duration_s > 0


def test_failed_on_exception_with_traceback(sandbox):
    result = sandbox.run("x = 1\nassert x == 2, 'x is not 2'")
    assert result.status is Status.FAILED
    assert result.returncode == 1
    assert "AssertionError: x is not 2" in result.stderr
    assert "main.py" in result.stderr and "_boot" not in result.stderr  # our frames stay out of it


def test_syntax_error_is_failed_not_error(sandbox):
    # A model's syntax error is its own failure (reward 0), not "cannot judge".
    result = sandbox.run("def f(:\n    pass")
    assert result.status is Status.FAILED
    assert "SyntaxError" in result.stderr


@pytest.mark.parametrize(
    ("program", "code"), [("import sys; sys.exit(3)", 3), ("raise SystemExit('bye')", 1)]
)
def test_exit_codes(sandbox, program, code):
    result = sandbox.run(program)
    assert result.status is Status.FAILED and result.returncode == code


def test_exit_zero_is_passed(sandbox):
    assert sandbox.run("import sys; print('x'); sys.exit(0)").status is Status.PASSED


def test_program_is_main_module(sandbox):
    program = "import __main__\nclass A: pass\nassert __main__.A is A\nif __name__ == '__main__':\n    print('main')"
    result = sandbox.run(program)
    assert result.status is Status.PASSED, result.stderr
    assert result.stdout == "main\n"


def test_minimal_environment_and_fresh_cwd(sandbox):
    program = (
        "import os, json\n"
        "open('left.txt', 'w').write('x')\n"
        "print(json.dumps({'env': sorted(os.environ), 'files': sorted(os.listdir('.'))}))"
    )
    first, second = sandbox.run(program), sandbox.run(program)
    assert first.status is Status.PASSED, first.stderr
    seen = json.loads(first.stdout)
    assert set(seen["env"]) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}
    assert seen["files"] == ["left.txt"]
    assert json.loads(second.stdout)["files"] == ["left.txt"]  # the first run's file is gone


def test_isolated_mode(sandbox):
    result = sandbox.run("import sys; print(sys.flags.isolated, sys.flags.ignore_environment)")
    assert result.stdout.split() == ["1", "1"]


def test_stderr_is_captured_separately(sandbox):
    result = sandbox.run("import sys; print('out'); print('err', file=sys.stderr)")
    assert result.stdout == "out\n" and result.stderr == "err\n"


def test_job_timeout_overrides_config(sandbox):
    result = sandbox.run("import time; time.sleep(0.8)", timeout_s=0.3)
    assert result.status is Status.TIMEOUT
    assert result.duration_s < 1.0


# ---------------------------------------------------------------- isolation report


def test_isolation_report_is_observed_and_summarized():
    report = _report()
    assert set(report.layers()) == set(report.LAYERS)
    assert report.python and report.python_version.startswith("3.")
    text = report.summary()
    assert "sandbox isolation" in text and report.python in text
    if IS_ROOT:
        # As root every layer we rely on must be there: a regression here silently weakens the sandbox.
        for layer in ("uid_drop", "no_new_privs", "no_capabilities"):
            assert report.layers()[layer], text
        assert (
            SandboxConfig().run_as_uid
            <= report.uid
            < SandboxConfig().run_as_uid + SandboxConfig().uid_pool_size
        )


def _machine_allows(*unshare_args: str) -> bool:
    cmd = ["unshare", *unshare_args, "true"]
    return shutil.which("unshare") is not None and subprocess.run(cmd, capture_output=True).returncode == 0


def test_report_claims_every_namespace_the_machine_allows():
    # Checked independently of the sandbox's own detection, so a broken launcher cannot hide as "unavailable".
    user = [] if IS_ROOT else ["--user", "--map-root-user"]
    layers = _report().layers()
    if _machine_allows(*user, "--net"):
        assert layers["network_namespace"]
    if _machine_allows(*user, "--pid", "--fork", "--mount-proc"):
        assert layers["pid_namespace"] and layers["mount_namespace"] and layers["read_only_fs"]
    with open("/proc/self/status") as f:
        seccomp = any(line.startswith("Seccomp:") for line in f)
    if seccomp and os.uname().machine in ("x86_64", "aarch64"):
        assert layers["unix_socket_filter"]


# ---------------------------------------------------------------- weak isolation is refused, or loud


@pytest.fixture(params=["no unshare", "unshare refused"])
def without_namespaces(request, monkeypatch):
    """Simulate a machine without namespaces: no launcher at all, or one that always fails (as unshare does
    where user namespaces are off). Detection is cached per launcher, so the real one is not disturbed."""
    fake = None if request.param == "no unshare" else shutil.which("false")
    monkeypatch.setattr(sandbox_module, "_find_unshare", lambda: fake)
    return request.param


def test_required_layers_default_to_the_namespaces_and_the_socket_filter():
    assert set(SandboxConfig().require) == set(REQUIRED_LAYERS)
    assert {"network_namespace", "pid_namespace", "mount_namespace", "unix_socket_filter"} <= set(
        REQUIRED_LAYERS
    )
    assert SandboxConfig().allow_weak_isolation is False


def test_missing_namespaces_are_refused_by_default(config, without_namespaces):
    layers = sandbox_module.isolation_report(config).layers()
    assert not layers["network_namespace"] and not layers["pid_namespace"] and not layers["mount_namespace"]
    for build in (
        lambda: Sandbox(config),
        lambda: CodeReward(timeout_s=2.0, memory_mb=256),
        lambda: VerifierReward(timeout_s=2.0, memory_mb=256),
    ):
        with pytest.raises(RuntimeError) as raised:
            build()
        message = str(raised.value)
        for layer in ("network_namespace", "pid_namespace", "mount_namespace"):
            assert layer in message
        assert "allow_weak_isolation" in message


def test_weak_isolation_on_purpose_runs_and_warns_every_run(config, without_namespaces, caplog):
    config.allow_weak_isolation = True
    with caplog.at_level(logging.WARNING, logger="reward.sandbox"):
        sandbox = Sandbox(config)
        built = [r.getMessage() for r in caplog.records]
        caplog.clear()
        results = [sandbox.run("print(6 * 7)"), *sandbox.run_many(["print(1)", "print(2)"])]
        per_run = [r.getMessage() for r in caplog.records]
    assert [r.status for r in results] == [Status.PASSED] * 3 and results[0].stdout == "42\n"
    for messages, expected in ((built, 1), (per_run, 2)):  # construction, then run and run_many
        weak = [m for m in messages if "WEAK SANDBOX" in m]
        assert len(weak) == expected, messages
        assert all("network_namespace" in m and "pid_namespace" in m for m in weak)
    assert sandbox.missing_layers and "mount_namespace" in sandbox.missing_layers


def test_code_reward_with_weak_isolation_on_purpose_scores_and_warns(without_namespaces, caplog):
    with caplog.at_level(logging.WARNING, logger="reward.sandbox"):
        reward = CodeReward(timeout_s=5.0, per_test_timeout_s=1.0, memory_mb=256, allow_weak_isolation=True)
        caplog.clear()
        out = reward(["p"], ["def add(a, b):\n    return a + b"], tests=[["assert add(1, 2) == 3"]])
    assert out.scores == [1.0]
    assert any("WEAK SANDBOX" in r.getMessage() for r in caplog.records)


def test_full_isolation_does_not_warn(config, caplog):
    with caplog.at_level(logging.WARNING, logger="reward.sandbox"):
        Sandbox(config).run("pass")
    assert not [r for r in caplog.records if "WEAK SANDBOX" in r.getMessage()]


def test_bad_allow_weak_isolation_is_rejected():
    with pytest.raises(ValueError, match="allow_weak_isolation"):
        SandboxConfig(allow_weak_isolation="yes")


def test_require_missing_layer_raises(config):
    missing = [name for name, on in _report().layers().items() if not on]
    if not missing:
        pytest.skip("every sandbox layer is active here, so none can be required and missing")
    config.require = (missing[0],)
    with pytest.raises(RuntimeError, match=missing[0]):
        Sandbox(config)


def test_require_active_layers_works(config):
    config.require = tuple(name for name, on in _report().layers().items() if on)
    assert Sandbox(config).run("pass").passed


# ---------------------------------------------------------------- break-out attempts


def test_fork_bomb_is_contained(sandbox, config):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = sandbox.run(program)
    assert result.status is Status.TIMEOUT, result
    assert time.monotonic() - start < config.timeout_s + 3
    assert sandbox.run("print('ok')").stdout == "ok\n"  # and the next run still works


def test_fork_bomb_hits_process_limit(sandbox, config):
    if not (_report().uid_drop or _report().user_namespace):
        pytest.skip("sandbox layers uid_drop and user_namespace inactive: RLIMIT_NPROC is not enforced here")
    program = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(1000):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(10)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError:\n"
        "    print('limit after', n)\n"
    )
    result = sandbox.run(program)
    assert result.status is Status.PASSED, result
    assert result.stdout.startswith("limit after")
    assert int(result.stdout.split()[-1]) < config.max_processes


@pytest.mark.parametrize(
    "program",
    ["a = []\nwhile True:\n    a.append(bytearray(10**7))", "x = bytearray(10**10)"],
    ids=["grow", "one-shot"],
)
def test_memory_bomb(sandbox, program):
    result = sandbox.run(program)
    assert result.status is Status.MEMORY, result
    assert "MemoryError" in result.stderr


def test_infinite_loop_times_out(sandbox, config):
    result = sandbox.run("while True:\n    pass")
    assert result.status is Status.TIMEOUT
    assert config.timeout_s <= result.duration_s < config.timeout_s + 1.5


def test_cpu_limit_ends_busy_program(config):
    config.timeout_s, config.cpu_s = 10.0, 1
    result = Sandbox(config).run("while True:\n    pass")
    assert result.status is Status.TIMEOUT
    assert result.signal == "SIGXCPU" and "CPU" in result.reason
    assert result.duration_s < 5


def test_no_connection_to_local_server(sandbox):
    _needs("network_namespace")  # required by default: the sandbox fixture already fails without it
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept_loop(stop):
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=accept_loop, args=(stop,))
    thread.start()
    program = (
        "import socket\n"
        "for host in ('127.0.0.1', 'localhost'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=1).sendall(b'hi')\n"
        "        print('connected')\n"
        "    except OSError as e:\n"
        "        print('blocked', type(e).__name__)\n"
    )
    try:
        result = sandbox.run(program)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert result.status is Status.PASSED, result
    assert "connected" not in result.stdout
    assert accepted == []


def test_writes_outside_temp_dir_do_not_land(sandbox, tmp_path):
    tag = uuid.uuid4().hex
    outside = tmp_path / "outside"
    outside.mkdir()
    targets = [outside / tag, Path("/tmp") / tag, Path("/var/tmp") / tag, Path("/dev/shm") / tag, REPO / tag]
    program = (
        "import os\n"
        f"for path in {[str(t) for t in targets]!r} + ['../' + {tag!r}]:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.errno)\n"
    )
    result = sandbox.run(program)
    assert result.status is Status.PASSED, result
    leaked = [t for t in targets if t.exists()]
    for t in leaked:
        t.unlink()
    assert leaked == []
    if _report().mount_namespace:
        assert f"refused {REPO / tag}" in result.stdout  # read-only view of the file system


def test_parent_secret_is_not_visible(sandbox, monkeypatch):
    secret = "sk-" + uuid.uuid4().hex
    monkeypatch.setenv("SANDBOX_TEST_SECRET", secret)
    program = (
        "import os, glob\n"
        "print(dict(os.environ))\n"
        f"paths = glob.glob('/proc/*/environ') + ['/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ']\n"
        "for path in paths:\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(path, 'refused', e.errno)\n"
    )
    result = sandbox.run(program)
    assert result.status is Status.PASSED, result
    assert "SANDBOX_TEST_SECRET" not in result.stdout and secret not in result.stdout


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_printing_gigabytes_is_cut(sandbox, config, stream):
    result = sandbox.run(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)")
    assert result.status is Status.KILLED, result
    assert "output" in result.reason and result.truncated
    assert len(getattr(result, stream)) <= config.max_output_bytes
    assert result.duration_s < config.timeout_s


def test_open_files_limit(config):
    config.max_open_files = 32
    program = (
        "import os\n"
        "fds = []\n"
        "try:\n"
        "    for _ in range(1000):\n"
        "        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError as e:\n"
        "    print(len(fds), e.errno)\n"
    )
    result = Sandbox(config).run(program)
    assert result.status is Status.PASSED, result
    opened, err = map(int, result.stdout.split())
    assert err == errno.EMFILE
    assert 16 <= opened < config.max_open_files  # stdio and the interpreter's own descriptors count too


def test_no_core_dumps(sandbox):
    program = "import os, resource\nprint(resource.getrlimit(resource.RLIMIT_CORE), flush=True)\nos.abort()"
    result = sandbox.run(program)
    assert result.stdout == "(0, 0)\n"  # soft and hard: the program cannot raise it again
    assert result.status is Status.KILLED and result.signal == "SIGABRT", result


def test_private_tmpfs_is_size_capped(config):
    _needs("mount_namespace")  # the capped tmpfs is part of the private mounts
    config.tmpfs_mb, config.max_file_mb = 8, 4  # several files, so the file-size limit is not what stops it
    program = (
        "import errno, os\n"
        "for where in ('.', '/tmp'):\n"
        "    written, code = 0, None\n"
        "    try:\n"
        "        for i in range(100):\n"
        "            with open(os.path.join(where, 'f%d' % i), 'wb') as f:\n"
        "                for _ in range(2):\n"
        "                    f.write(b'x' * (1 << 20))\n"
        "                    f.flush()\n"
        "                    written += 1\n"
        "    except OSError as e:\n"
        "        code = e.errno\n"
        "    print(where, written, code)\n"
    )
    result = Sandbox(config).run(program)
    assert result.status is Status.PASSED, result
    for line in result.stdout.splitlines():
        where, written, code = line.split()
        assert int(code) == errno.ENOSPC, line
        assert 4 <= int(written) <= config.tmpfs_mb, line  # MB that fit before the tmpfs was full


def test_no_unix_socket_to_a_listener_on_the_host(sandbox):
    """A path-bound socket is reachable from any network namespace, and a read-only mount does not stop
    connect(): only the socket filter does. The socket lives in a folder the sandbox can see (not /tmp,
    which is private there) and is writable by everyone, as D-Bus's system socket is."""
    folder = tempfile.mkdtemp(prefix=".sandbox-sock-", dir=REPO)
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "host.sock")
    abstract = "\0sandbox-test-" + uuid.uuid4().hex
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    try:
        servers[0].bind(path)
        os.chmod(path, 0o777)
        servers[1].bind(abstract)
        for server in servers:
            server.listen()
            server.setblocking(False)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)  # the listener works from here
        probe.close()
        servers[0].accept()[0].close()
        program = (
            "import os, socket\n"
            f"print('reachable', os.path.exists({path!r}) and os.access({path!r}, os.W_OK))\n"
            f"for address in ({path!r}, {abstract!r}):\n"
            "    try:\n"
            "        s = socket.socket(socket.AF_UNIX)\n"
            "        s.connect(address)\n"
            "        s.sendall(b'hi')\n"
            "        print('connected', repr(address))\n"
            "    except OSError as e:\n"
            "        print('blocked', e.errno)\n"
            "try:\n"
            "    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
            f"    a.sendto(b'hi', {path!r})\n"
            "    print('sent datagram')\n"
            "except OSError as e:\n"
            "    print('blocked', e.errno)\n"
        )
        result = sandbox.run(program)
        accepted = []
        for server in servers:
            try:
                accepted.append(server.accept())
            except BlockingIOError:
                pass
    finally:
        for server in servers:
            server.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert result.status is Status.PASSED, result
    lines = result.stdout.splitlines()
    if lines[0] != "reachable True":
        pytest.skip(f"{REPO} is not visible and writable to the sandbox uid, so this test cannot tell")
    assert lines[1:] == ["blocked 1"] * 3  # EPERM from the filter, for both addresses and the datagram
    assert accepted == []


def test_big_file_hits_file_size_limit(sandbox):
    result = sandbox.run("with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 65536)")
    assert result.status is Status.FAILED
    assert "File too large" in result.stderr or "No space left" in result.stderr


def test_killing_parent_fails_and_nothing_else_dies(sandbox):
    victim = subprocess.Popen(["sleep", "30"])
    program = (
        "import os, signal\n"
        f"for pid in (os.getppid(), 1, {os.getpid()}, {os.getppid()}, {victim.pid}):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        print('killed', pid, flush=True)\n"
        "    except OSError as e:\n"
        "        print('refused', pid, e.errno, flush=True)\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"
        "except OSError as e:\n"
        "    print('kill(-1) refused', e.errno, flush=True)\n"
        "print('still here', flush=True)\n"
    )
    try:
        result = sandbox.run(program)
        victim_alive = victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    assert victim_alive
    assert f"killed {victim.pid}" not in result.stdout
    # kill(-1) reaches only what the program may signal: at most itself, never a cannot-judge "error".
    assert result.status in (Status.PASSED, Status.KILLED), result
    assert sandbox.run("print('ok')").stdout == "ok\n"


def test_killing_own_group_is_killed_not_error(sandbox):
    result = sandbox.run("import os, signal\nos.killpg(0, signal.SIGKILL)")
    assert result.status is Status.KILLED and result.signal == "SIGKILL"


def test_background_process_does_not_outlive_run(sandbox):
    _needs("pid_namespace")  # without it a setsid daemon escapes the process group
    marker = str(900000 + uuid.uuid4().int % 99999)
    program = (
        "import os, subprocess, time\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "print('daemonized')\n"
    )
    result = sandbox.run(program)
    assert result.status is Status.PASSED, result
    deadline = time.monotonic() + 2
    while (left := _pids_with_arg(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def test_timed_out_run_leaves_no_zombie(sandbox, monkeypatch):
    # The sandbox's PID 1 must be reaped by the launcher, not handed to the system's init as a zombie.
    seen = []
    real = sandbox_module._kill_run

    def recording(pid):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                seen.extend(int(c) for c in f.read().split())
        except OSError:
            pass
        real(pid)

    monkeypatch.setattr(sandbox_module, "_kill_run", recording)
    assert sandbox.run("import time\ntime.sleep(30)", timeout_s=0.5).status is Status.TIMEOUT
    if not seen:
        pytest.skip("no /proc/<pid>/task/<pid>/children on this kernel")
    assert [pid for pid in seen if os.path.exists(f"/proc/{pid}")] == []


# ---------------------------------------------------------------- parallel runs, errors, config


def test_concurrent_runs_get_their_own_uid(sandbox):
    _needs("uid_drop")  # root only
    results = sandbox.run_many(["import os, time\ntime.sleep(0.3)\nprint(os.getuid())"] * 2)
    uids = {int(r.stdout) for r in results}
    assert len(uids) == 2
    assert all(
        sandbox.config.run_as_uid <= u < sandbox.config.run_as_uid + sandbox.config.uid_pool_size
        for u in uids
    )


HOLD_A_UID = """
import sys, time
from reward.sandbox import _UidPool
pool = _UidPool(lock_dir=sys.argv[1])
print(pool.acquire(int(sys.argv[2]), int(sys.argv[3])), flush=True)
time.sleep(float(sys.argv[4]))
"""


def test_the_uid_pool_is_machine_wide_another_process_never_gets_a_held_uid(tmp_path):
    """Two processes (two trainers, two test workers) draw from one pool: a held uid is skipped, and it is
    free again once its holder ends (the kernel drops the lock even on SIGKILL)."""
    pool = sandbox_module._UidPool(lock_dir=tmp_path)

    def other(size: int, hold_s: float = 0.0) -> subprocess.Popen:
        cmd = [sys.executable, "-c", HOLD_A_UID, str(tmp_path), "5000", str(size), str(hold_s)]
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)

    mine = pool.acquire(5000, 2)
    assert mine == 5000
    proc = other(2)
    assert int(proc.stdout.readline()) == 5001 and proc.wait() == 0
    pool.release(mine)
    proc = other(1, hold_s=60)  # holds 5000 until killed
    assert int(proc.stdout.readline()) == 5000
    assert pool.acquire(5000, 2) == 5001
    proc.kill()
    proc.wait()
    assert pool.acquire(5000, 1) == 5000  # waits for, then takes, the uid the killed process held


def test_runs_in_two_processes_get_their_own_uid(sandbox):
    _needs("uid_drop")  # root only
    program = "import os, time\ntime.sleep(1.5)\nprint(os.getuid())"
    code = f"from reward.sandbox import Sandbox\nprint(Sandbox().run({program!r}).stdout.strip())"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the runs overlap: each sleeps 1.5 s inside the sandbox
    here = sandbox.run(program, timeout_s=10)
    there, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and here.status is Status.PASSED
    assert int(here.stdout) != int(there.strip().splitlines()[-1])


def test_fork_bomb_does_not_starve_a_concurrent_run(sandbox):
    # RLIMIT_NPROC counts per uid: with one shared uid the bomb would make this run's fork fail.
    _needs("uid_drop")  # without root every run has one uid, so concurrent runs share the process budget
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    spawner = "import subprocess, time\ntime.sleep(0.5)\nprint(subprocess.run(['echo', 'spawned'], capture_output=True, text=True).stdout)"
    bombed, spawned = sandbox.run_many([bomb, spawner])
    assert bombed.status is Status.TIMEOUT
    assert spawned.status is Status.PASSED, spawned
    assert spawned.stdout.strip() == "spawned"


def test_uid_pool_must_not_overlap_an_account(config):
    import pwd

    if not IS_ROOT:
        pytest.skip("the pool is only used as root")
    account = next((p for p in pwd.getpwall() if 0 < p.pw_uid < 60000), None)
    if account is None:
        pytest.skip("no account with a small uid here")
    config.run_as_uid, config.uid_pool_size = account.pw_uid, 1
    with pytest.raises(ValueError, match=account.pw_name):
        Sandbox(config)


def test_run_many_keeps_order_and_bounds_workers(sandbox, monkeypatch):
    in_flight, peak, lock = [0], [0], threading.Lock()
    real = sandbox_module._run_job

    def counting(*args, **kwargs):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(sandbox_module, "_run_job", counting)
    jobs = [SandboxJob(f"import time; time.sleep(0.1); print({i})") for i in range(6)]
    results = sandbox.run_many(jobs)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert peak[0] == 2


def test_run_many_accepts_strings_and_rejects_junk(sandbox):
    assert [r.status for r in sandbox.run_many(["pass", "1/0"])] == [Status.PASSED, Status.FAILED]
    assert sandbox.run_many([]) == []
    with pytest.raises(TypeError, match="job 1"):
        sandbox.run_many(["pass", 3])
    with pytest.raises(TypeError, match="str"):
        sandbox.run(b"print(1)")


def test_infrastructure_failure_is_error_not_exception(sandbox, monkeypatch):
    monkeypatch.setattr(sandbox._setup, "python", "/nonexistent/python3")
    result = sandbox.run("print(1)")
    assert result.status is Status.ERROR
    assert result.reason


def test_unusable_interpreter_fails_at_construction(config):
    config.python = "/nonexistent/python3"
    with pytest.raises(RuntimeError, match="no way to run the sandbox"):
        Sandbox(config)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_s", 0),
        ("memory_mb", -1),
        ("memory_mb", 32),
        ("max_workers", 0),
        ("max_open_files", 4),
        ("cpu_s", 1.5),
        ("run_as_uid", 2**31),
        ("uid_pool_size", 0),
        ("run_as_gid", 1.5),
    ],
)
def test_bad_config_is_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SandboxConfig(**{field: value})


def test_unknown_required_layer_is_rejected():
    with pytest.raises(ValueError, match="unknown layers"):
        SandboxConfig(require=("seccomp",))


# ---------------------------------------------------------------- without root


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _python_for_nobody() -> str | None:
    """An interpreter that uid 65534 can run and that can import this checkout (None if there is none)."""
    check = f"import json, socket, sys; sys.path.insert(0, {str(REPO)!r}); import reward.sandbox"
    for python in (sys.executable, "/usr/bin/python3"):
        if (
            subprocess.run([*AS_NOBODY, python, "-I", "-c", check], capture_output=True, cwd="/").returncode
            == 0
        ):
            return python
    return None


def test_works_without_root_and_reports_it():
    if not IS_ROOT or not shutil.which("setpriv"):
        pytest.skip("needs root to start a process as another user")
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no Python that uid 65534 can run with this checkout on its path")
    # -I drops PYTHONPATH, so the checkout goes on the path explicitly.
    script = (
        f"import json, sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from reward.sandbox import Sandbox, SandboxConfig\n"
        "sb = Sandbox(SandboxConfig(timeout_s=2, memory_mb=256))\n"
        "runs = sb.run_many(['print(1)', '1/0', 'while True: pass'])\n"
        "print(json.dumps({'report': sb.isolation_report().layers(), 'statuses': [r.status for r in runs]}))\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp"}
    done = subprocess.run(
        [*AS_NOBODY, python, "-I", "-c", script], capture_output=True, text=True, env=env, cwd="/", timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["statuses"] == ["passed", "failed", "timeout"]
    assert seen["report"]["uid_drop"] is False  # reported as missing, not claimed
