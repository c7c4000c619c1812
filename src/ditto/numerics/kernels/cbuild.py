"""Build a C source string into a shared library once (cached on disk) and load it with ctypes.

Shared by the project's run-time C kernels (batch_invariant, integer_attention_c). The library is
keyed by a hash of the source, the compile flags, the compiler's version and the CPU flags, and
lives in $DITTO_KERNEL_CACHE (default ~/.cache/ditto/kernels). OpenMP comes from the libgomp that
torch already loaded (torch is imported first), so torch.set_num_threads governs the kernels too.
Without a usable compiler, or when the kernel's DITTO_*_DISABLE_KERNEL variable is set, `load()`
returns None and `error` says why: every caller keeps a pure-torch fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


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


def _compile(cc: str, source: str, flags: Sequence[str], so_path: Path) -> None:
    so_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so_path.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        out = Path(tmp) / "kernel.so"
        subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(out, so_path)  # atomic: concurrent builders (pytest-xdist, several engines) are safe


class CLibrary:
    """A C kernel built and loaded lazily, once per process (thread-safe).

    name: file-name prefix of the cached .so; source: the C code; disable_env: an environment
    variable that, when set non-empty, disables the kernel; setup(lib) declares argtypes and may
    run a self-test, returning None when the library is usable or the reason it is not.
    """

    def __init__(
        self,
        name: str,
        source: str,
        disable_env: str,
        setup: Callable[[ctypes.CDLL], str | None],
        flags: Sequence[str] = DEFAULT_FLAGS,
    ):
        self.name, self.source, self.disable_env, self.setup = name, source, disable_env, setup
        self.flags = tuple(flags)
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

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
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            return None, "no C compiler found"
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"compiler unusable: {e}"
        parts = [self.source, version, cpu_flags(), platform.machine(), " ".join(self.flags)]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        cache = Path(os.environ.get("DITTO_KERNEL_CACHE", Path.home() / ".cache" / "ditto" / "kernels"))
        so_path = cache / f"{self.name}_{key[:20]}.so"
        try:
            if not so_path.exists():
                _compile(cc, self.source, self.flags, so_path)
            # torch is imported first, so libgomp.so.1 resolves to torch's copy: one OpenMP pool.
            lib = ctypes.CDLL(str(so_path))
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"kernel build failed: {e}"
        reason = self.setup(lib)
        return (None, reason) if reason is not None else (lib, None)
