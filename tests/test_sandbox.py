"""The code sandbox: every test runs a real subprocess and tries to escape."""

from __future__ import annotations

import os
import socket
import time

import pytest

from ditto.strategies.sandbox import SandboxLimits, SandboxResult, run_code

FAST = SandboxLimits(timeout_s=5.0, cpu_s=5)


def _listening_socket():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_prints_math_results():
    r = run_code("import math, fractions\nprint(math.comb(10, 3), fractions.Fraction(1, 3) + fractions.Fraction(1, 6))")
    assert isinstance(r, SandboxResult)
    assert r.ok and r.returncode == 0 and not r.timed_out and r.killed_reason is None
    assert r.stdout == "120 1/2\n"
    assert r.seconds > 0


def test_sympy_import_works():
    pytest.importorskip("sympy")
    r = run_code("import sympy\nx = sympy.symbols('x')\nprint(sorted(sympy.solve(x**2 - 4, x)))", FAST)
    assert r.ok, r.stderr
    assert r.stdout.strip() == "[-2, 2]"


def test_errors_reported_not_raised():
    r = run_code("print('before')\n1/0", FAST)
    assert not r.ok and r.returncode == 1
    assert r.stdout == "before\n"
    assert "ZeroDivisionError" in r.stderr


def test_reading_etc_passwd_refused():
    r = run_code("print(open('/etc/passwd').read())", FAST)
    assert not r.ok
    assert "root:" not in r.stdout
    assert "PermissionError" in r.stderr


def test_writing_outside_refused(tmp_path):
    target = tmp_path / "escape.txt"
    r = run_code(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert not r.ok and "PermissionError" in r.stderr
    assert not target.exists()
    r = run_code("import os\nos.mkdir('/tmp/ditto-sandbox-escape-dir')", FAST)
    assert not r.ok and not os.path.exists("/tmp/ditto-sandbox-escape-dir")


def test_symlink_escape_refused():
    r = run_code("import os\nos.symlink('/etc/passwd', 'p')\nprint(open('p').read())", FAST)
    assert not r.ok and "root:" not in r.stdout


def test_writing_inside_work_dir_allowed():
    code = "import os\nopen('a.txt', 'w').write('hello')\nos.mkdir('d')\nprint(open('a.txt').read(), os.listdir('.'))"
    r = run_code(code, FAST)
    assert r.ok, r.stderr
    assert r.stdout.startswith("hello")


def test_socket_creation_refused():
    r = run_code("import socket\ns = socket.socket()\nprint('created')", FAST)
    assert not r.ok and "created" not in r.stdout


def test_connect_to_localhost_refused():
    srv = _listening_socket()
    port = srv.getsockname()[1]
    try:
        r = run_code(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')", FAST
        )
        assert not r.ok and "connected" not in r.stdout
    finally:
        srv.close()


def test_network_namespace_without_audit_hook():
    """The kernel layer alone: with the audit hook off, connect() still cannot reach the host."""
    srv = _listening_socket()
    port = srv.getsockname()[1]
    try:
        code = (
            "import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
            "except OSError as e:\n    print('refused', e)"
        )
        r = run_code(code, SandboxLimits(timeout_s=5, audit_hook=False))
        if not r.layers.get("netns"):
            pytest.skip("no network namespace on this host")
        assert r.ok and r.stdout.startswith("refused"), r.stdout + r.stderr
    finally:
        srv.close()


def test_landlock_without_audit_hook():
    r = run_code("print(open('/etc/passwd').read())", SandboxLimits(timeout_s=5, audit_hook=False))
    if not r.layers.get("landlock"):
        pytest.skip("no Landlock on this host")
    assert not r.ok and "root:" not in r.stdout


def test_fork_bomb_contained():
    code = "import os\nwhile True:\n    os.fork()"
    r = run_code(code, SandboxLimits(timeout_s=5, max_processes=8))
    assert not r.ok
    assert "PermissionError" in r.stderr or r.timed_out
    r = run_code("import subprocess\nsubprocess.run(['true'])", FAST)
    assert not r.ok and "PermissionError" in r.stderr


def test_fork_bomb_contained_by_pids_cgroup_alone():
    """With the audit hook off the pids cgroup must stop the bomb, and the kill must leave nothing."""
    code = (
        "import os\n"
        "n = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            import time; time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print('forked', n, flush=True)\n"
        "import time; time.sleep(30)\n"
    )
    r = run_code(code, SandboxLimits(timeout_s=3, max_processes=8, audit_hook=False))
    if not r.layers.get("pids_cgroup"):
        pytest.skip("no writable pids cgroup on this host")
    assert r.timed_out and r.killed_reason == "timeout"
    n = int(r.stdout.split()[1])
    assert n < 8
    time.sleep(0.2)
    survivors = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"ditto-sandbox-" in f.read():
                        survivors.append(pid)
            except OSError:
                pass
    assert survivors == []


def test_infinite_loop_killed_within_time_limit():
    t0 = time.monotonic()
    r = run_code("while True:\n    pass", SandboxLimits(timeout_s=1.5, cpu_s=30))
    elapsed = time.monotonic() - t0
    assert r.timed_out and r.killed_reason == "timeout" and not r.ok
    assert elapsed < 4.0


def test_cpu_limit_kills():
    r = run_code("while True:\n    pass", SandboxLimits(timeout_s=10, cpu_s=1))
    assert not r.ok and r.killed_reason == "cpu" and not r.timed_out


def test_memory_hog_killed():
    r = run_code("x = bytearray(4 * 1024**3)\nprint(len(x))", SandboxLimits(timeout_s=10, memory_bytes=512 << 20))
    assert not r.ok and r.killed_reason == "memory"
    assert r.stdout == ""


def test_output_truncated():
    r = run_code(
        "import sys\nfor _ in range(1000):\n    print('x' * 1000)\nprint('y' * 10, file=sys.stderr)",
        SandboxLimits(timeout_s=5, max_output_bytes=4096),
    )
    assert r.ok and r.truncated
    assert len(r.stdout) < 4096 + 100 and "truncated" in r.stdout
    assert r.stderr == "y" * 10 + "\n"


def test_file_size_limit():
    r = run_code("open('big', 'wb').write(b'0' * (4 << 20))", SandboxLimits(timeout_s=5, max_file_bytes=1 << 20))
    assert not r.ok
