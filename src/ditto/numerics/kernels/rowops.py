"""RMSNorm and rotary embedding of fp32 rows in one C call each (eager torch issues ~10 ops for either,
20-30 us at batch 1: a third of a small model's decode step).

Contract (ditto/csrc/float_rowops.c computes it; the torch functions here are its reference):

* rmsnorm(x) = (x * r) * (offset + w), r = 1 / sqrt(ss / D + eps) with IEEE fp32 division and
  square root, where ss, the sum of squares of the row, is taken in one fixed order: 16 lanes,
  lane j adds x[i]^2 for i = j, j + 16, j + 32, ... in index order, then the lanes fold by halves
  (lane j += lane j + 8, then + 4, + 2, + 1). Each product and sum rounds on its own (no FMA). The
  bits depend on the row alone: the same for every batch, thread count and machine.
* rope(x) = x * cos + rotate_half(x) * sin, each product rounded, then one add: what `Rotary`
  computes with torch ops, bit for bit (the tables are Rotary's own).

Without a C compiler, or with DITTO_ROWOPS_DISABLE_KERNEL=1, the torch references run (same bits).
"""

from __future__ import annotations

import ctypes

import torch

from ditto.numerics.kernels.cbuild import CLibrary

__all__ = ["add_rmsnorm", "kernel_available", "rmsnorm", "rmsnorm_reference", "rope", "rope_reference"]

LANES = 16


def _setup(lib: ctypes.CDLL) -> str | None:
    p, n, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    lib.ditto_rmsnorm.argtypes = [p, n, n, n, p, f, f, p, n]
    lib.ditto_rmsnorm.restype = n
    lib.ditto_rope.argtypes = [p, n, n, n, n, p, p, p, p, n]
    lib.ditto_rope.restype = n
    lib.ditto_add_rmsnorm.argtypes = [p, p, n, n, p, f, f, p, p]
    lib.ditto_add_rmsnorm.restype = n
    return None


_LIBRARY = CLibrary(
    "float_rowops.c", "DITTO_ROWOPS_DISABLE_KERNEL", _setup, ("-O3", "-march=native", "-shared", "-fPIC")
)


def kernel_available() -> bool:
    return _LIBRARY.load() is not None


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """The contract in torch ops (one op per lane step: slow, exact). x (..., D) fp32 -> (..., D)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d).float()  # (M, D)
    sq = rows * rows
    acc = torch.zeros(rows.shape[0], LANES)
    full = d - d % LANES
    for i in range(0, full, LANES):
        acc = acc + sq[:, i : i + LANES]
    if d > full:
        acc[:, : d - full] = acc[:, : d - full] + sq[:, full:]
    half = LANES // 2
    while half >= 1:
        acc = torch.cat([acc[:, :half] + acc[:, half : 2 * half], acc[:, 2 * half :]], dim=1)
        half //= 2
    ss = acc[:, 0:1]  # (M, 1)
    # tensor / tensor of the same shape: an IEEE division (torch turns `/ scalar` into a reciprocal multiply)
    mean = ss / torch.full_like(ss, float(d))
    # torch's fp32 sqrt is not always correctly rounded (a vector approximation); the double square
    # root of a float, rounded to float, is (53 >= 2 * 24 + 2 bits)
    root = torch.sqrt((mean + torch.tensor(eps, dtype=torch.float32)).double()).float()
    r = torch.ones_like(ss) / root
    gain = torch.tensor(offset, dtype=torch.float32) + weight.float()
    return ((rows * r) * gain).reshape(x.shape)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """The contract's RMSNorm of fp32 x (..., D) with fp32 weight (D,) -> new fp32 (..., D)."""
    lib = _LIBRARY.lib or _LIBRARY.load()
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return rmsnorm_reference(x, weight, offset, eps)
    d = x.shape[-1]
    xr = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    m = xr.numel() // d if d else 0
    if m:
        rc = lib.ditto_rmsnorm(xr.data_ptr(), m, d, d, weight.data_ptr(), offset, eps, y.data_ptr(), d)
        if rc:
            raise RuntimeError(f"ditto_rmsnorm failed ({rc}) for shape {tuple(x.shape)}")
    return y


def add_rmsnorm(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, offset: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, rmsnorm(x + a)) for fp32 (M, D) x and a: a residual add and the next norm in one call."""
    lib = _LIBRARY.lib or _LIBRARY.load()
    usable = (
        lib is not None
        and x.dtype == a.dtype == weight.dtype == torch.float32
        and x.dim() == 2
        and x.shape == a.shape
        and x.is_contiguous()
        and a.is_contiguous()
        and x.device.type == "cpu"
    )
    if not usable:
        s = x + a
        return s, rmsnorm(s, weight, offset, eps)
    m, d = x.shape
    s, y = torch.empty(m, d), torch.empty(m, d)
    if m:
        rc = lib.ditto_add_rmsnorm(
            x.data_ptr(), a.data_ptr(), m, d, weight.data_ptr(), offset, eps, s.data_ptr(), y.data_ptr()
        )
        if rc:
            raise RuntimeError(f"ditto_add_rmsnorm failed ({rc}) for shape {tuple(x.shape)}")
    return s, y


def rope_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary's torch ops: x (T, H, D), positions (T,), tables (P, D) -> (T, H, D)."""
    c = cos[positions].unsqueeze(1).to(x.dtype)  # (T, 1, D)
    s = sin[positions].unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of fp32 x (T, H, D) at int64 positions (T,) with fp32 tables (P, D) -> new (T, H, D).
    Positions must lie in [0, P)."""
    lib = _LIBRARY.lib or _LIBRARY.load()
    usable = (
        lib is not None
        and x.dtype == torch.float32
        and x.dim() == 3
        and x.device.type == "cpu"
        and positions.dtype == torch.int64
        and cos.dtype == torch.float32
        and cos.is_contiguous()
        and sin.is_contiguous()
        and x.stride(2) == 1
        and x.stride(1) == x.shape[2]
    )
    if not usable:
        return rope_reference(x, positions, cos, sin)
    t, h, d = x.shape
    pos = positions if positions.is_contiguous() else positions.contiguous()
    y = torch.empty(t, h, d, dtype=torch.float32)
    if t:
        rc = lib.ditto_rope(
            x.data_ptr(), t, h, d, x.stride(0), pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), h * d
        )
        if rc:
            raise RuntimeError(f"ditto_rope failed ({rc}) for shape {tuple(x.shape)}")
    return y
