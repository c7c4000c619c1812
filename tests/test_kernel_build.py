"""The C kernels as source files: every file in ditto/csrc builds warning-free, the cache key follows
the source and its headers, and a compiler error reaches the caller in the compiler's own words."""

from __future__ import annotations

import ctypes

import pytest
from kernel_build import KERNELS, PORTABLE_FLAGS

from ditto.numerics.kernels.cbuild import CSRC, CLibrary, KernelBuildError, find_compiler, source_files

STRICT = ("-Wall", "-Wextra", "-Werror")


def _compiler() -> str:
    try:
        return find_compiler()[0]
    except KernelBuildError as e:
        pytest.skip(str(e))


def _no_setup(lib: ctypes.CDLL) -> str | None:
    return None


def test_every_source_file_is_a_kernel():
    assert {lib.source for lib in KERNELS.values()} == set(CSRC.glob("*.c"))
    assert all(path.exists() for lib in KERNELS.values() for path in source_files(lib.source))


@pytest.mark.parametrize("portable", [False, True], ids=["default-flags", "portable-flags"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_builds_with_all_warnings_as_errors(name, portable, monkeypatch, tmp_path):
    """-Wall -Wextra -Werror on the kernel's own flags (-march=native: the AVX-512 paths where the CPU has them)
    and on plain portable flags (the generic C loops)."""
    _compiler()
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path))
    lib = KERNELS[name].with_flags(PORTABLE_FLAGS if portable else None, extra=STRICT)
    assert lib.compile().exists()  # KernelBuildError carries the compiler's warnings otherwise


def test_integer_kernels_share_one_header():
    headers = {name: [p.name for p in source_files(KERNELS[name].source)[1:]] for name in KERNELS}
    assert headers["integer_attention_c"] == headers["integer_elementwise_c"] == ["ditto_int.h"]


def test_cache_key_follows_the_included_header(monkeypatch, tmp_path):
    _compiler()
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "k.h").write_text("static inline int seven(void) { return 7; }\n")
    (tmp_path / "k.c").write_text('#include "k.h"\nint ditto_k(void) { return seven(); }\n')
    lib = CLibrary(tmp_path / "k.c", "DITTO_TEST_DISABLE_KERNEL", _no_setup, ("-O1", "-shared", "-fPIC"))
    first = lib.compile()
    assert lib.compile() == first  # cached
    (tmp_path / "k.h").write_text("static inline int seven(void) { return 8; }\n")
    second = lib.compile()
    assert second != first
    assert ctypes.CDLL(str(second)).ditto_k() == 8


def test_compiler_error_is_shown(monkeypatch, tmp_path):
    _compiler()
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.c").write_text("int ditto_bad(void) { return undeclared_name; }\n")
    lib = CLibrary(tmp_path / "bad.c", "DITTO_TEST_DISABLE_KERNEL", _no_setup, ("-O1", "-shared", "-fPIC"))
    with pytest.raises(KernelBuildError, match="undeclared_name") as err:
        lib.compile()
    assert "bad.c" in str(err.value)
    assert lib.load() is None and "undeclared_name" in lib.status()  # callers fall back, the reason is kept


def test_disabled_kernel_is_not_built(monkeypatch, tmp_path):
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("DITTO_TEST_DISABLE_KERNEL", "1")
    lib = CLibrary(CSRC / "noise.c", "DITTO_TEST_DISABLE_KERNEL", _no_setup)
    assert lib.load() is None and lib.status() == "disabled by DITTO_TEST_DISABLE_KERNEL"
    assert not list(tmp_path.iterdir())
