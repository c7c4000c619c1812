"""Shared by the C-kernel tests: every compiled kernel, and the same kernel source built without -march=native."""

from __future__ import annotations

import pytest

from ditto.engine import attention_c
from ditto.numerics.kernels import (
    batch_invariant,
    bf16_linear,
    gguf_blocks,
    gguf_lut,
    integer_attention_c,
    integer_elementwise_c,
    noise_c,
    rowops,
)
from ditto.numerics.kernels.cbuild import CLibrary

PORTABLE_FLAGS = ("-O2", "-fopenmp", "-shared", "-fPIC")
# every run-time C kernel of the package (one per file in ditto/csrc)
KERNELS: dict[str, CLibrary] = {
    m.__name__.rsplit(".", 1)[-1]: m._LIBRARY
    for m in (
        attention_c,
        batch_invariant,
        bf16_linear,
        gguf_blocks,
        gguf_lut,
        integer_attention_c,
        integer_elementwise_c,
        noise_c,
        rowops,
    )
}


def use_portable_build(monkeypatch, tmp_path, kern) -> None:
    """Build `kern`'s C source with plain flags (no AVX-512 paths) into tmp_path and make `kern` use it;
    skips the test when no compiler can build it."""
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path))
    generic = kern._LIBRARY.with_flags(PORTABLE_FLAGS)
    if generic.load() is None:
        pytest.skip(f"portable build: {generic.error}")
    monkeypatch.setattr(kern, "_LIBRARY", generic)
