"""C kernel for the sampling noise hash: the SplitMix64 bits of every vocab id in one pass.

`ditto.sampling.noise_bits` defines the bits with int64 torch ops (wrapping arithmetic = arithmetic
mod 2^64); this loop computes the same integers on uint64 (integer only, so the same bits on every
machine), without the ~12 full-vocab temporaries. `select` returns only the ids whose 53-bit
uniform numerator reaches a threshold, which is all `gumbel_argmax` needs from most of the vocab.

The C source is ditto/csrc/noise.c, built at first use with the system C compiler (`cbuild`);
without one, or with DITTO_NOISE_DISABLE_KERNEL=1, `bits`/`select` return None and callers keep
the torch path.
"""

from __future__ import annotations

import ctypes

import torch

from ditto.numerics.kernels.cbuild import CLibrary

__all__ = ["bits", "kernel_status", "select"]


_MASK64 = (1 << 64) - 1


def _setup(lib: ctypes.CDLL) -> str | None:
    u64, i64, p = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
    lib.ditto_noise_bits.argtypes = [u64, i64, p]
    lib.ditto_noise_bits.restype = None
    lib.ditto_noise_select.argtypes = [u64, i64, u64, p]
    lib.ditto_noise_select.restype = i64
    return None


_LIBRARY = CLibrary("noise.c", "DITTO_NOISE_DISABLE_KERNEL", _setup, flags=("-O2", "-shared", "-fPIC"))


def kernel_status() -> str:
    return _LIBRARY.status()


def bits(key: int, n: int) -> torch.Tensor | None:
    """int64 (n,) noise bits for vocab ids 0..n-1 under the signed 64-bit `key`, or None without the kernel."""
    lib = _LIBRARY.load()
    if lib is None:
        return None
    out = torch.empty(n, dtype=torch.int64)
    lib.ditto_noise_bits(key & _MASK64, n, out.data_ptr())
    return out


def select(key: int, n: int, m_min: int) -> torch.Tensor | None:
    """Ascending int64 ids whose bits >>> 11 >= m_min, or None without the kernel."""
    lib = _LIBRARY.load()
    if lib is None:
        return None
    out = torch.empty(n, dtype=torch.int64)
    count = lib.ditto_noise_select(key & _MASK64, n, max(0, m_min), out.data_ptr())
    return out[:count]
