"""The bf16 x bf16 linear with fp32 accumulation whose reduction order is fixed by the code.

Contract (`reference_linear` is its torch statement; the C kernel, ditto/csrc/bf16_linear.c, meets it
bit for bit on every instruction-set path): for x (M, K) bf16 and weight (N, K) bf16,

* bf16 subnormals in x and the weight count as zeros of their sign (DAZ); K is zero-padded to even;
* each output element is one fp32 chain from +0.0 over the pairs (k, k+1), k = 0, 2, ...:
  ``acc = FTZ(fma(x[k+1], w[k+1], acc)); acc = FTZ(fma(x[k], w[k], acc))`` -- the odd element
  first, each step one rounding to nearest even (bf16 x bf16 products are exact in fp32), FTZ
  turning a result below FLT_MIN in magnitude into a zero of its sign;
* with a bias: ``acc = FTZ(acc + DAZ(float(bias[n])))``; the output is acc rounded to bf16 (nearest even).

That is exactly what one lane of AVX512_BF16's ``vdpbf16ps`` computes per instruction (Intel's
definition; measured bit-identical on AMD Zen 4 by tests/test_bf16_kernel.py), so the fast path is
the instruction itself, and the AVX-512 / AVX2 / portable paths emulate it (two FMAs per pair with
MXCSR's FTZ and DAZ set; scalar fmaf with explicit flushes). An element depends only on its own row
of x and column of the weight, never on M, the row's position, the other rows or the thread count.

Paths: ``avx512_bf16`` (vdpbf16ps), ``avx512``, ``avx2``, ``portable``; the best one this CPU runs
is the default, ``DITTO_BF16_ISA=...`` or the ``isa`` argument forces one (tests run them all).
DITTO_BF16_DISABLE_KERNEL=1 turns the kernel off (callers fall back to their own invariant path).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ditto.numerics.kernels.cbuild import CLibrary

__all__ = [
    "ISA_ENV",
    "PackedBf16",
    "isa_paths",
    "kernel_available",
    "kernel_status",
    "linear",
    "pack_weight",
    "reference_linear",
]

ISA_ENV = "DITTO_BF16_ISA"
_NR = 64  # columns per packed panel (NR in csrc/bf16_linear.c)
_MC = 96  # rows per work item at most (cache blocking and load balance only; never changes an order)
_PATH_CODES = {"avx512_bf16": 4, "avx512": 3, "avx2": 2, "portable": 1}  # ISA_* of the C file
_FLT_MIN = 1.17549435e-38
_ERRORS = {-1: "the kernel rejected its arguments", -3: f"${ISA_ENV} names no path this CPU runs"}


def _setup(lib: ctypes.CDLL) -> str | None:
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.ditto_bf16_isa_supported.argtypes = [i]
    lib.ditto_bf16_isa_supported.restype = i
    lib.ditto_bf16_linear.argtypes = [p, n, n, n, p, n, p, p, n, n, i]
    lib.ditto_bf16_linear.restype = i
    return None


_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
_LIBRARY = CLibrary("bf16_linear.c", "DITTO_BF16_DISABLE_KERNEL", _setup, _FLAGS)


def kernel_available() -> bool:
    """True when the compiled kernel is usable (builds it on first call)."""
    return _LIBRARY.load() is not None


def kernel_status() -> str:
    """'ok' or the reason the kernel is unavailable (for manifests / logs)."""
    return _LIBRARY.status()


def isa_paths() -> tuple[str, ...]:
    """The instruction-set paths this CPU runs, best first (empty without the kernel)."""
    lib = _LIBRARY.load()
    if lib is None:
        return ()
    return tuple(name for name, code in _PATH_CODES.items() if lib.ditto_bf16_isa_supported(code))


def _daz(t: Tensor) -> Tensor:
    """bf16 subnormals -> zeros of their sign (sign and exponent bits kept, the mantissa dropped)."""
    u = t.view(torch.int16)
    return torch.where((u & 0x7F80) == 0, u & -0x8000, u).view(torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# packing and the kernel call
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedBf16:
    """A bf16 (N, K) weight as ceil(N/64) panels of (Kp/2, 64, 2): per pair of k, the 64 columns'
    (w[k], w[k+1]) side by side (what vdpbf16ps reads); zero padded, subnormals flushed."""

    data: Tensor  # (num_panels, Kp // 2, 64, 2) bf16
    n: int
    k: int

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype


def pack_weight(weight: Tensor) -> PackedBf16:
    """Repack a bf16 nn.Linear weight (N, K) for the kernel."""
    if weight.dim() != 2 or weight.dtype != torch.bfloat16:
        raise ValueError(f"weight must be a 2-D bf16 (N, K) tensor, got {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    kp, num_panels = k + k % 2, (n + _NR - 1) // _NR
    wt = torch.zeros(kp, num_panels * _NR, dtype=torch.bfloat16)  # (Kp, N padded)
    wt[:k, :n] = _daz(weight.detach().to("cpu")).t()
    data = wt.view(kp // 2, 2, num_panels, _NR).permute(2, 0, 3, 1).contiguous()  # (P, Kp/2, 64, 2)
    return PackedBf16(data, n, k)


def _isa_code(isa: str | None) -> int:
    if isa is None:
        return 0  # the library reads $DITTO_BF16_ISA, else takes the best path
    if isa not in isa_paths():
        raise ValueError(f"isa={isa!r}: not a path this CPU runs ({', '.join(isa_paths()) or 'no kernel'})")
    return _PATH_CODES[isa]


def linear(x: Tensor, packed: PackedBf16, bias: Tensor | None = None, *, isa: str | None = None) -> Tensor:
    """bf16 x (M, K) @ packed^T (+ bias) -> bf16 (M, N) by the C kernel (bit for bit `reference_linear`)."""
    lib = _LIBRARY.load()
    if lib is None:
        raise RuntimeError(f"bf16 linear kernel unavailable: {_LIBRARY.error}")
    if x.dim() != 2 or x.shape[1] != packed.k or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"x must be a 2-D bf16 CPU tensor (M, {packed.k}), got {tuple(x.shape)} {x.dtype}")
    m = x.shape[0]
    if packed.k % 2:  # the kernel reads x in pairs: one zero column makes K even
        x = torch.cat([x, x.new_zeros(m, 1)], dim=1)
    elif x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    y = torch.empty(m, packed.n, dtype=torch.bfloat16)
    if m == 0 or packed.n == 0:
        return y
    b = None
    panels, mc = packed.data.shape[0], _MC
    while mc > 6 and -(-m // mc) * panels < 8 * torch.get_num_threads():  # enough work items for every thread
        mc = max(6, mc // 12 * 6)
    if bias is not None:
        b = torch.zeros(panels * _NR, dtype=torch.float32)  # (panels * 64,)
        b[: packed.n] = bias.detach().to(torch.float32)
    rc = lib.ditto_bf16_linear(
        x.data_ptr(),
        m,
        packed.data.shape[1],
        x.stride(0),
        packed.data.data_ptr(),
        packed.n,
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        y.stride(0),
        mc,
        _isa_code(isa),
    )
    if rc != 0:
        raise ValueError(_ERRORS.get(rc, f"kernel error {rc}") + (f" ({ISA_ENV}={os.environ.get(ISA_ENV)!r})"))
    return y


# ----------------------------------------------------------------------------------------------
# the contract in torch (slow: one elementwise step per k; for tests)
# ----------------------------------------------------------------------------------------------


def _ftz(t: Tensor) -> Tensor:
    """fp32 results below FLT_MIN in magnitude -> zeros of their sign."""
    return torch.where(t.abs() < _FLT_MIN, t * 0, t)


def reference_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The contract, step by step: bf16 (M, K) x bf16 (N, K) -> bf16 (M, N).

    One fma step is computed in float64 and rounded to fp32: the product of two bf16 is exact in
    float64, and rounding the float64 sum of two numbers of at most 24 significant bits to fp32 is
    the correctly rounded fp32 sum (double rounding is innocuous, 53 >= 2 * 24 + 2).
    """
    xf = _daz(x.to(torch.bfloat16)).double()  # (M, K)
    wf = _daz(weight.to(torch.bfloat16)).double()  # (N, K)
    k = xf.shape[1]
    if k % 2:
        xf, wf = torch.nn.functional.pad(xf, (0, 1)), torch.nn.functional.pad(wf, (0, 1))
    acc = torch.zeros(xf.shape[0], wf.shape[0], dtype=torch.float32)  # (M, N)
    for j in range(0, xf.shape[1], 2):
        for kk in (j + 1, j):
            acc = _ftz((acc.double() + xf[:, kk, None] * wf[None, :, kk]).float())
    if bias is not None:
        b = _ftz(bias.detach().float()).double()
        acc = _ftz((acc.double() + b[None, :]).float())
    return acc.to(torch.bfloat16)
