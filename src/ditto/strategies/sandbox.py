"""Run model-written Python in a separate, confined process.

Layers (each applied where the host allows it; `SandboxResult.layers` records which held):

  kernel   - a fresh network namespace (unshare CLONE_NEWNET: no interfaces but a downed loopback),
           - Landlock (Linux >= 5.13): the filesystem is read-only outside the work dir, and only the
             Python installation, shared libraries and a few device files are readable at all,
           - a pids cgroup capping the number of tasks (root ignores RLIMIT_NPROC; cgroups do not),
           - rlimits: CPU seconds, address space, file size, open files, processes, no core dumps,
           - its own session / process group, killed as a whole at the wall-clock deadline.
  python   - isolated mode (-I -B), cwd in a fresh temporary directory, stdin from /dev/null,
           - an audit hook installed before user code: refuses sockets, fork/exec/spawn/subprocess,
             ctypes symbol lookups and calls, opens/listings outside the allowed roots, writes and
             other mutations outside the work dir, and tampering with function objects via gc.

Output is read incrementally and truncated to `max_output_bytes` per stream, so a print loop cannot
exhaust the parent's memory.  This is defence in depth, not a proof of isolation: the kernel layers
are what hold against native code.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field

EXIT_MEMORY = 86  # the bootstrap's exit status after a MemoryError (address-space limit hit)
# (87: the bootstrap could not install a required layer, i.e. require_netns without a network namespace)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, whole process group killed after it
    cpu_s: int = 10  # RLIMIT_CPU (SIGXCPU then SIGKILL)
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 16  # pids cgroup / RLIMIT_NPROC (threads count too)
    max_output_bytes: int = 64 << 10  # per stream, the rest is dropped
    network: bool = False  # True disables the network layers (never used by strategies)
    extra_read_paths: tuple[str, ...] = ()  # more read-only roots (e.g. a data directory)
    require_netns: bool = False  # fail instead of falling back to the audit hook alone
    audit_hook: bool = True  # False only to test the kernel layers on their own


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited with status 0 within every limit
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None  # "timeout" | "cpu" | "memory" | "file_size" | "signal:N" | None
    returncode: int | None
    seconds: float
    truncated: bool = False
    layers: dict = field(default_factory=dict)


def _read_roots(limits: SandboxLimits) -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            roots.add(sysconfig.get_paths()[key])
    roots.update(p for p in sys.path if p and os.path.isdir(p))
    roots.update(limits.extra_read_paths)
    return sorted({os.path.realpath(r) for r in roots if r})


_BOOTSTRAP = r"""
import os, sys
cfg_path = sys.argv[1]
import json
with open(cfg_path) as f:
    cfg = json.load(f)
layers = {}
work = cfg["work"]
import resource
lim = cfg["limits"]
def _rl(name, value, hard=None):
    try:
        resource.setrlimit(getattr(resource, name), (value, value if hard is None else hard))
        return True
    except (ValueError, OSError):
        return False
layers["rlimits"] = all([
    _rl("RLIMIT_CPU", lim["cpu_s"], lim["cpu_s"] + 1),
    _rl("RLIMIT_AS", lim["memory_bytes"]),
    _rl("RLIMIT_FSIZE", lim["max_file_bytes"]),
    _rl("RLIMIT_NOFILE", lim["max_open_files"]),
    _rl("RLIMIT_NPROC", lim["max_processes"]),
    _rl("RLIMIT_CORE", 0),
])
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
if cfg.get("cgroup"):
    try:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        layers["pids_cgroup"] = True
    except OSError:
        layers["pids_cgroup"] = False
if not lim["network"]:
    layers["netns"] = libc.unshare(0x40000000) == 0  # CLONE_NEWNET
    if not layers["netns"] and cfg["require_netns"]:
        sys.stderr.write("sandbox: network namespace unavailable\n")
        os._exit(87)
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
with open(cfg["code_path"]) as f:
    _src = f.read()
_layers_file = open(cfg["layers_path"], "w")

def _landlock():
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi < 1:
        return False
    EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
    handled = (1 << 13) - 1  # all access rights of ABI 1
    if abi >= 2:
        handled |= 1 << 13  # REFER
    if abi >= 3:
        handled |= 1 << 14  # TRUNCATE
    class Attr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64)]
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    attr = Attr(handled)
    rfd = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if rfd < 0:
        return False
    def add(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            is_dir = os.path.isdir(path)
            if not is_dir:
                access &= EXECUTE | WRITE_FILE | READ_FILE | (1 << 14)
            pb = PathBeneath(access & handled, fd)
            libc.syscall(445, rfd, 1, ctypes.byref(pb), 0)  # LANDLOCK_RULE_PATH_BENEATH
        finally:
            os.close(fd)
    ro = EXECUTE | READ_FILE | READ_DIR
    for p in cfg["read_roots"] + cfg["system_roots"]:
        add(p, ro)
    for p in cfg["device_files"]:
        add(p, READ_FILE | WRITE_FILE)
    add(work, handled)
    ok = libc.syscall(446, rfd, 0) == 0  # landlock_restrict_self
    os.close(rfd)
    return ok
try:
    layers["landlock"] = bool(_landlock())
except Exception:
    layers["landlock"] = False
json.dump(layers, _layers_file)
_layers_file.close()
del libc, _layers_file

def _make_hook(work, read_roots, devices, realpath, fsdecode, sep, O_WRITE):
    work_prefix = work + sep
    read_prefixes = tuple(r + sep for r in read_roots)
    read_exact = frozenset(read_roots) | frozenset(devices)
    deny_prefixes = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                     "os.exec", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "pty.",
                     "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata", "ctypes.addressof",
                     "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
                     "os.symlink", "os.link", "os.setuid", "os.setgid", "sys.remote_exec")
    mutating = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                          "os.utime", "os.chdir", "os.chflags", "os.mkfifo", "os.mknod", "os.setxattr",
                          "os.removexattr", "shutil.rmtree"))
    guarded_attrs = frozenset(("__code__", "__globals__"))

    def resolve(p):
        if isinstance(p, int):
            return None
        return realpath(fsdecode(p))

    def inside_work(p):
        return p == work or p.startswith(work_prefix)

    def readable(p):
        return inside_work(p) or p in read_exact or p.startswith(read_prefixes)

    def hook(event, args):
        if event.startswith(deny_prefixes):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open":
            path, mode, flags = args
            if path is None:
                return
            p = resolve(path)
            if p is None:
                return
            write = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & O_WRITE)
            if inside_work(p) or (p in devices) or (not write and readable(p)):
                return
            raise PermissionError("sandbox: access to %r is not allowed" % (p,))
        if event in ("os.listdir", "os.scandir"):
            path = args[0] if args else None
            if path is None or path == "" or isinstance(path, int):
                return
            p = resolve(path)
            if not readable(p):
                raise PermissionError("sandbox: listing %r is not allowed" % (p,))
            return
        if event == "os.rename" or event == "os.replace":
            for a in args[:2]:
                if not inside_work(resolve(a) or work):
                    raise PermissionError("sandbox: renaming outside the work dir is not allowed")
            return
        if event in mutating:
            a = args[0] if args else None
            if a is None or isinstance(a, int):
                return
            if not inside_work(resolve(a)):
                raise PermissionError("sandbox: %s outside the work dir is not allowed" % event)
            return
        if event == "ctypes.dlopen" and args and args[0] is not None:
            raise PermissionError("sandbox: loading native libraries is not allowed")
        if event == "object.__setattr__" and len(args) >= 2 and args[1] in guarded_attrs:
            raise PermissionError("sandbox: rewriting function objects is not allowed")
    return hook

import io, traceback, builtins, codeop  # noqa: preload what error reporting needs
os.chdir(work)
_hook = _make_hook(work, tuple(cfg["read_roots"]), frozenset(cfg["device_files"]), os.path.realpath,
                   os.fsdecode, os.sep, os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
import _posixsubprocess
def _denied(*a, **k):
    raise PermissionError("sandbox: process creation is not allowed")
if cfg["audit_hook"]:
    _posixsubprocess.fork_exec = _denied
    sys.addaudithook(_hook)
del _hook, _make_hook, cfg, f, json, ctypes
_ns = {"__name__": "__main__", "__builtins__": builtins}
sys.argv = ["main.py"]
try:
    exec(compile(_src, "main.py", "exec"), _ns)
except MemoryError:
    sys.stderr.write("MemoryError: sandbox memory limit exceeded\n")
    sys.stderr.flush()
    os._exit(86)
except SystemExit:
    raise
except BaseException:
    try:
        traceback.print_exc()
    except MemoryError:
        os._exit(86)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)
"""

_SYSTEM_ROOTS = ("/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime", "/bin", "/sbin")
_DEVICE_FILES = ("/dev/null", "/dev/urandom", "/dev/zero")


def _make_pids_cgroup(max_processes: int) -> str | None:
    """A fresh pids cgroup (v2 unified or v1 'pids' hierarchy), or None where we may not make one."""
    for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if not os.path.isdir(base) or not os.access(base, os.W_OK):
            continue
        path = os.path.join(base, f"ditto-sandbox-{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(path)
        except OSError:
            continue
        try:
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(max_processes))
            return path
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(path)
    return None


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _remove_cgroup(path: str) -> None:
    for _ in range(50):
        pids = _cgroup_pids(path)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.02)


def _killpg(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def run_code(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:  # noqa: B008
    """Run `code` as a fresh Python process inside the sandbox; never raises for user-code failures."""
    start = time.monotonic()
    base, cfg_path, cfg = _prepare(code, limits)
    out = _Output(limits.max_output_bytes)
    proc = None
    try:
        proc = _spawn(cfg_path, cfg["work"])
        deadline = start + limits.timeout_s
        timed_out = _pump(proc, out, deadline)
        returncode, timed_out = _wait(proc, deadline, timed_out)
    finally:
        layers = _release(proc, cfg, base, limits)
    seconds_used = time.monotonic() - start
    reason = _killed_reason(returncode, timed_out, out.text(2), limits.cpu_s, seconds_used)
    out.mark_truncation()
    return SandboxResult(
        ok=(returncode == 0 and not timed_out),
        stdout=out.text(1),
        stderr=out.text(2),
        timed_out=timed_out,
        killed_reason=reason,
        returncode=returncode,
        seconds=seconds_used,
        truncated=out.dropped,
        layers=layers,
    )


def _prepare(code: str, limits: SandboxLimits) -> tuple[str, str, dict]:
    """A private temporary folder with the code, a work dir and the bootstrap's config (pids cgroup
    included where one can be made): (folder, config path, config)."""
    base = tempfile.mkdtemp(prefix="ditto-sandbox-")
    work = os.path.join(base, "work")
    os.mkdir(work)
    os.chmod(base, 0o700)
    code_path = os.path.join(base, "main.py")
    with open(code_path, "w") as f:
        f.write(code)
    cfg = {
        "work": os.path.realpath(work),
        "code_path": code_path,
        "layers_path": os.path.join(base, "layers.json"),
        "cgroup": _make_pids_cgroup(limits.max_processes),
        "read_roots": _read_roots(limits),
        "system_roots": [p for p in _SYSTEM_ROOTS if os.path.exists(p)],
        "device_files": list(_DEVICE_FILES),
        "require_netns": limits.require_netns,
        "audit_hook": limits.audit_hook,
        "limits": {
            "cpu_s": int(limits.cpu_s),
            "memory_bytes": int(limits.memory_bytes),
            "max_file_bytes": int(limits.max_file_bytes),
            "max_open_files": int(limits.max_open_files),
            "max_processes": int(limits.max_processes),
            "network": bool(limits.network),
        },
    }
    cfg_path = os.path.join(base, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return base, cfg_path, cfg


def _spawn(cfg_path: str, work: str) -> subprocess.Popen:
    """The bootstrap in isolated mode, in its own session, with a minimal environment."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, cfg_path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=work,
        env=env,
        start_new_session=True,
        close_fds=True,
    )


class _Output:
    """stdout (1) and stderr (2) of the sandboxed process, each kept up to `limit` bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self.buf = {1: bytearray(), 2: bytearray()}
        self.dropped = False

    def add(self, stream: int, chunk: bytes) -> None:
        buf = self.buf[stream]
        room = self.limit - len(buf)
        if room > 0:
            buf += chunk[:room]
        if len(chunk) > max(room, 0):
            self.dropped = True

    def text(self, stream: int) -> str:
        return self.buf[stream].decode("utf-8", "replace")

    def mark_truncation(self) -> None:
        if self.dropped:
            for buf in self.buf.values():
                if len(buf) >= self.limit:
                    buf += b"\n[... output truncated ...]\n"


def _pump(proc: subprocess.Popen, out: _Output, deadline: float) -> bool:
    """Read both pipes until they close or the deadline passes (True: timed out, process group killed)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, 1)
    sel.register(proc.stderr, selectors.EVENT_READ, 2)
    open_streams, timed_out = 2, False
    while open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(remaining, 0.25)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            out.add(key.data, chunk)
    sel.close()
    if timed_out:
        _killpg(proc.pid)
    return timed_out


def _wait(proc: subprocess.Popen, deadline: float, timed_out: bool) -> tuple[int, bool]:
    """(exit status, timed out) once the process has exited, killing it at the deadline."""
    try:
        returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        _killpg(proc.pid)
        returncode = proc.wait()
    _killpg(proc.pid)  # stragglers that kept the group alive
    return returncode, timed_out


def _release(proc: subprocess.Popen | None, cfg: dict, base: str, limits: SandboxLimits) -> dict:
    """Kill what is left, close the pipes, remove the cgroup and the folder; the layers that held."""
    if proc is not None:
        if proc.poll() is None:
            _killpg(proc.pid)
            proc.wait()
        for s in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                s.close()
    if cfg["cgroup"]:
        _remove_cgroup(cfg["cgroup"])
    layers = {}
    with contextlib.suppress(OSError, ValueError), open(cfg["layers_path"]) as f:
        layers = json.load(f)
    layers["audit_hook"] = limits.audit_hook
    shutil.rmtree(base, ignore_errors=True)
    return layers


def _killed_reason(returncode: int | None, timed_out: bool, stderr: str, cpu_s: int, seconds: float) -> str | None:
    """Why the process was stopped: "timeout" | "cpu" | "memory" | "file_size" | "signal:N" | None."""
    if timed_out:
        return "timeout"
    if returncode == EXIT_MEMORY:
        return "memory"
    if returncode is None or returncode >= 0:
        return None
    sig = -returncode
    if sig == signal.SIGKILL and "MemoryError" in stderr:
        return "memory"
    if sig == signal.SIGKILL and cpu_s <= seconds:
        return "cpu"
    return {signal.SIGXCPU: "cpu", signal.SIGXFSZ: "file_size"}.get(sig, f"signal:{sig}")
