"""Shared by the C-kernel tests: the same kernel source built without -march=native."""

from __future__ import annotations

import pytest

from ditto.numerics.kernels.cbuild import CLibrary

PORTABLE_FLAGS = ("-O2", "-fopenmp", "-shared", "-fPIC")


def use_portable_build(monkeypatch, tmp_path, kern, name: str) -> None:
    """Build `kern`'s C source with plain flags (no AVX-512 paths) into tmp_path and make `kern` use it;
    skips the test when no compiler can build it."""
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path))
    generic = CLibrary(name, kern._C_SRC, "DITTO_INT_DISABLE_KERNEL", kern._setup, PORTABLE_FLAGS)
    if generic.load() is None:
        pytest.skip(f"portable build: {generic.error}")
    monkeypatch.setattr(kern, "_LIBRARY", generic)
