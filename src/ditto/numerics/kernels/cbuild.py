"""Build a C kernel from `ditto/csrc/` into a shared library once (cached on disk) and load it with ctypes.

Shared by the project's run-time C kernels (batch_invariant, integer_attention, integer_elementwise,
noise, float_attention). A kernel names its source file; the library is keyed by a hash of that
file's content and of the local headers it includes (`#include "ditto_int.h"`), the compile flags,
the compiler's version and the CPU flags, and lives in $DITTO_KERNEL_CACHE (default
~/.cache/ditto/kernels). The compiler's `--version` text is remembered there too, by the compiler
binary's path, size and mtime (compilers.json), so a run whose kernels are cached starts no process.
OpenMP comes from the libgomp that torch already loaded (torch is imported first), so
torch.set_num_threads governs the kernels too.

`CLibrary.compile()` raises `KernelBuildError` (with the compiler's own message) when the kernel
cannot be built; `load()` never raises: without a usable compiler, or when the kernel's
DITTO_*_DISABLE_KERNEL variable is set, it returns None and `error` says why, and every caller keeps
a pure-torch fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

DEFAULT_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
CSRC = Path(str(resources.files("ditto") / "csrc"))  # the kernels' C sources (package data)
COMPILE_TIMEOUT_S = 120
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class KernelBuildError(RuntimeError):
    """A C kernel could not be built: no compiler, or the compiler's own error message."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> str:
    """The CPU feature line of /proc/cpuinfo (part of the cache key: -march=native builds)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def source_files(source: Path) -> list[Path]:
    """`source` and the local headers it includes (recursively), each once, in the order met."""
    files, todo = [], [source]
    while todo:
        path = todo.pop(0)
        if path in files:
            continue
        files.append(path)
        todo += [path.parent / name for name in _LOCAL_INCLUDE.findall(path.read_text())]
    return files


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("DITTO_KERNEL_CACHE", Path.home() / ".cache" / "ditto" / "kernels"))


def _compiler_stamp(cc: str) -> str | None:
    """The resolved compiler binary with its size and mtime (a new compiler: a new stamp), or None."""
    try:
        real = os.path.realpath(shutil.which(cc) or cc)
        st = os.stat(real)
    except OSError:
        return None
    return f"{real}|{st.st_size}|{st.st_mtime_ns}"


_VERSIONS: dict[str, str] = {}  # compiler stamp -> --version text, this process


def _compiler_version(cc: str) -> str:
    """`cc --version`, remembered by the compiler's stamp in the kernel cache (compilers.json), so a
    run whose kernels are cached starts no process. KernelBuildError when the compiler cannot run."""
    stamp = _compiler_stamp(cc)
    if stamp is not None and stamp in _VERSIONS:
        return _VERSIONS[stamp]
    memo = kernel_cache_dir() / "compilers.json"
    known: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        known = dict(json.loads(memo.read_text()))
    if stamp is None or not isinstance(known.get(stamp), str):
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f"compiler {cc} unusable: {e}") from e
        if stamp is None:
            return version
        known[stamp] = version
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, memo)  # atomic: a concurrent reader sees the old or the new file
    _VERSIONS[stamp] = known[stamp]
    return known[stamp]


def find_compiler() -> tuple[str, str]:
    """(compiler, its --version text): $CC, else gcc, else cc; KernelBuildError when none works."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise KernelBuildError("no C compiler found (set CC or install gcc)")
    return cc, _compiler_version(cc)


def _compile(cc: str, source: Path, flags: Sequence[str], so_path: Path) -> None:
    """Compile `source` (its includes resolve beside it) into so_path; KernelBuildError with the compiler's stderr."""
    so_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so_path.parent) as tmp:
        out = Path(tmp) / "kernel.so"
        cmd = [cc, *flags, str(source), "-o", str(out), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise KernelBuildError(f"{cc} took over {COMPILE_TIMEOUT_S} s on {source.name}") from e
        except OSError as e:
            raise KernelBuildError(f"{cc} could not run: {e}") from e
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip()
            raise KernelBuildError(f"{source.name}: `{' '.join(cmd)}` failed (exit {done.returncode}):\n{message}")
        os.replace(out, so_path)  # atomic: concurrent builders (pytest-xdist, several engines) are safe


class CLibrary:
    """A C kernel built and loaded lazily, once per process (thread-safe).

    source: a file name under ditto/csrc/ or an absolute path (its stem prefixes the cached .so);
    disable_env: an environment variable that, when set non-empty, disables the kernel; setup(lib)
    declares argtypes and may run a self-test, returning None when the library is usable or the
    reason it is not.
    """

    def __init__(
        self,
        source: str | Path,
        disable_env: str,
        setup: Callable[[ctypes.CDLL], str | None],
        flags: Sequence[str] = DEFAULT_FLAGS,
    ):
        self.source, self.disable_env, self.setup = CSRC / source, disable_env, setup
        self.name = self.source.stem
        self.flags = tuple(flags)
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def with_flags(self, flags: Sequence[str] | None = None, extra: Sequence[str] = ()) -> CLibrary:
        """The same kernel built with `flags` (default: this one's) followed by `extra` (e.g. -Wall -Werror)."""
        base = self.flags if flags is None else tuple(flags)
        return CLibrary(self.source, self.disable_env, self.setup, (*base, *extra))

    def compile(self) -> Path:
        """Path of the built shared library, compiling it unless the cache has it; KernelBuildError otherwise."""
        cc, version = find_compiler()
        digest = hashlib.sha256()
        for path in source_files(self.source):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        parts = [digest.hexdigest(), version, cpu_flags(), platform.machine(), " ".join(self.flags)]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        so_path = kernel_cache_dir() / f"{self.name}_{key[:20]}.so"
        if not so_path.exists():
            _compile(cc, self.source, self.flags, so_path)
        return so_path

    def load(self) -> ctypes.CDLL | None:
        """The loaded library (building it on first use), or None (then `error` says why)."""
        if self.lib is not None or self.error is not None:
            return self.lib
        with self._lock:
            if self.lib is None and self.error is None:
                self.lib, self.error = self._build()
        return self.lib

    def status(self) -> str:
        """'ok' or the reason the kernel is unavailable (for manifests / logs)."""
        return "ok" if self.load() is not None else str(self.error)

    def _build(self) -> tuple[ctypes.CDLL | None, str | None]:
        if os.environ.get(self.disable_env):
            return None, f"disabled by {self.disable_env}"
        try:
            # torch is imported first, so libgomp.so.1 resolves to torch's copy: one OpenMP pool.
            lib = ctypes.CDLL(str(self.compile()))
        except KernelBuildError as e:
            return None, f"kernel build failed: {e}"
        except OSError as e:
            return None, f"kernel load failed: {e}"
        reason = self.setup(lib)
        return (None, reason) if reason is not None else (lib, None)
