"""Quantisation math shared by the numerics modes: quantise / dequantise functions and int kernels.

Every quantiser states its round-trip error bound in its docstring; tests/test_numerics.py checks
each bound on random data. Conventions:

* int8 symmetric: ``x ~= q * scale`` with ``q`` in [-127, 127] (-128 is never produced, so the
  grid is symmetric and ``-q`` never overflows).
* int4 group-wise: ``w ~= (q - 8) * scale + zero`` with ``q`` in [0, 15], one bf16 ``scale`` and
  ``zero`` per group of ``group_size`` consecutive input features (this is the convention of
  torch's CPU int4 "tinygemm" kernel; symmetric quantisation is the special case ``zero = 0``).
* MXINT8 (OCP Microscaling v1.0): blocks of 32 consecutive values along K share an E8M0 scale
  ``2**e``; elements are int8 read as fixed point with 6 fractional bits, so
  ``x ~= q * 2**(e - 6)``.

Scales are kept in float32 for the int8 formats and in bf16 for int4 (what the kernel consumes;
the quantiser rounds the scale to bf16 *before* quantising so the stated bound holds for the
scale actually stored).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn import functional as F

INT8_MAX = 127
MX_BLOCK = 32
MX_ELEM_FRAC_BITS = 6  # MXINT8 element = int8 * 2**-6 (range [-127/64, 127/64])
MX_EXP_MIN, MX_EXP_MAX = -127, 127  # E8M0 exponent range (255 = NaN is never produced)


# ---------------------------------------------------------------- int8 symmetric (per row / per channel)


def quantize_int8_symmetric(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 along `dim` (one scale per slice across `dim`).

    Returns ``(q int8, scale float32)`` with ``scale`` keeping `dim` as size 1, such that
    ``x ~= q * scale``, ``scale = max|x| / 127`` (1.0 for an all-zero slice).

    Error bound: ``|x - q*scale| <= scale/2`` per element, up to the float32 rounding of
    ``x/scale`` (relative 2**-24 of at most 127, i.e. ``+ 127 * 2**-24 * scale``).
    Per-output-channel weights: ``dim=1`` on (N, K); per-token activations: ``dim=-1`` on (M, K).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float32 (exact: an int8 times a float32 scale rounds once)."""
    return q.float() * scale


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32 (M, N), exact (int32 accumulation, no overflow for K < 2**17).

    torch._int_mm on CPU accepts any M, K, N (checked for M=1, K=5, N=7); on CUDA it needs
    M > 16 and K, N multiples of 8, so there the operands are zero-padded (zero rows/columns add
    nothing to the integer dot products) and the result sliced back.
    `b` may be a transposed view of an (N, K) contiguous weight: on CPU that is the fast layout.
    """
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    if (mp, kp, np_) != (m, k, n):
        a = F.pad(a, (0, kp - k, 0, mp - m))
        b = F.pad(b, (0, np_ - n, 0, kp - k))
    return torch._int_mm(a, b)[:m, :n]


def int8_gemm(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """W8A8 product ``(qx*sx) @ (qw*sw).T`` via int32 accumulation: ``_int_mm(qx, qw.T) * sx * sw``.

    qx (M, K) int8 with sx (M, 1); qw (N, K) int8 with sw (N,) or (N, 1). Returns float32 (M, N).
    The integer part is exact; the only roundings are int32->fp32 (exact below 2**24) and the two
    scale multiplications (exact when the scales are powers of two).
    """
    acc = int_mm(qx, qw.t())
    return acc.float().mul_(sx).mul_(sw.reshape(1, -1))


CHUNK_ELEMS = 1 << 20  # ~4 MB of fp32 weight per chunk: stays in cache, no 100 MB temporaries


def chunked_linear(
    x: torch.Tensor,
    n_out: int,
    weight_rows: Callable[[int, int], torch.Tensor],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` where ``weight_rows(s, e)`` materialises rows s:e of W in x's dtype.

    Upcasting / dequantising a whole large weight per call (lm_head: 49152 x 576) writes a
    100+ MB temporary and is page-fault bound (~8x slower than doing it in ~1M-element row
    chunks). The chunking depends only on the weight's shape, never on M, so results do not
    depend on the batch size through it.
    """
    k = x.shape[-1]
    rows = max(64, CHUNK_ELEMS // max(k, 1) // 64 * 64)
    if n_out <= rows:
        return F.linear(x, weight_rows(0, n_out), bias)
    out = x.new_empty(x.shape[0], n_out)
    for s in range(0, n_out, rows):
        e = min(n_out, s + rows)
        out[:, s:e] = F.linear(x, weight_rows(s, e), None if bias is None else bias[s:e])
    return out


# ---------------------------------------------------------------- int4 group-wise


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= x, for finite positive float32 x (returned as bf16)."""
    bits = x.float().contiguous().view(torch.int32)
    up = (bits + 0xFFFF) & ~0xFFFF
    return up.view(torch.float32).bfloat16()


def quantize_int4_groupwise(
    w: torch.Tensor, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise 4-bit quantisation of (N, K) weights along K (K % group_size == 0).

    Returns ``(q uint8 (N, K) in [0, 15], scale bf16 (N, K/G), zero bf16 (N, K/G))`` with
    ``w ~= (q - 8) * scale + zero``.

    * symmetric: ``scale = max|w| / 7`` rounded *up* to bf16, ``zero = 0``; q - 8 in [-7, 7].
      Error bound: ``|w - deq| <= scale/2`` (nothing ever clamps since |w|/scale <= 7).
    * asymmetric: ``scale = (max - min) / 15`` rounded up to bf16, ``zero = bf16(min + 8*scale)``.
      Error bound: ``|w - deq| <= scale/2 + |zero - (min + 8*scale)|`` (the second term is the
      bf16 rounding of the zero, at most half a bf16 ulp of |zero|; it only matters for the
      values within that distance of the group's min or max, which clamp).
    Dequantisation in float32 adds one rounding of ``(q-8)*scale + zero`` (relative 2**-24).
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        amax = g.abs().amax(-1)
        scale = _round_up_bf16(torch.clamp(amax / 7, min=tiny))
        zero = torch.zeros_like(scale)
        q = torch.round(g / scale.float().unsqueeze(-1)).clamp_(-8, 7) + 8
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        # a constant group gets a small nonzero scale so that zero's bf16 rounding stays tiny
        span = torch.maximum(hi - lo, torch.maximum(lo.abs(), hi.abs()) * 2**-8)
        scale = _round_up_bf16(torch.clamp(span / 15, min=tiny))
        zero = (lo + 8 * scale.float()).bfloat16()
        q = torch.round((g - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).add_(8).clamp_(0, 15)
    return q.reshape(n, k).to(torch.uint8), scale, zero


def dequantize_int4_groupwise(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype=torch.float32
) -> torch.Tensor:
    """``(q - 8) * scale + zero`` per group -> (N, K) in `dtype` (computed in float32)."""
    n, k = q.shape
    g = q.reshape(n, k // group_size, group_size).float().sub_(8)
    g.mul_(scale.float().unsqueeze(-1)).add_(zero.float().unsqueeze(-1))
    return g.reshape(n, k).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, element 2j in the low nibble, 2j+1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


TINYGEMM_BLOCK_N = 64  # torch's CPU int4 packing interleaves rows in blocks of 64 (N % 64 == 0 here)


@functools.cache
def int4_cpu_kernel_available() -> bool:
    """Whether torch.ops.aten._weight_int4pack_mm_for_cpu works here (bf16 activations)."""
    try:
        q = torch.zeros(64, 32, dtype=torch.int32)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.zeros(1, 64, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), p, 32, sz)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack_int4_tinygemm_cpu(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] (N % 64 == 0) -> torch's CPU int4 kernel layout, (N, K/2) uint8."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def unpack_int4_tinygemm_cpu(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_tinygemm_cpu (layout probed on torch 2.13: per block of 64 rows and per
    k, 32 bytes; byte j holds row j in the low nibble and row j+32 in the high nibble)."""
    n, k2 = p.shape
    k = 2 * k2
    b = p.reshape(n // TINYGEMM_BLOCK_N, k, TINYGEMM_BLOCK_N // 2)
    rows = torch.cat([b & 0xF, b >> 4], dim=-1)  # (NB, K, 64)
    return rows.transpose(1, 2).reshape(n, k)


# ---------------------------------------------------------------- MXINT8 (OCP microscaling)


def quantize_mxint8(x: torch.Tensor, block: int = MX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """MXINT8 along the last dim (length a multiple of `block`).

    Each block of `block` values shares ``e = floor(log2(max|x|))`` (E8M0, clamped to
    [-127, 127]; -127 for an all-zero block) and elements ``q = clamp(round(x * 2**(6-e)), ±127)``.
    Returns ``(q int8 (..., K), e int16 (..., K/block))``; ``x ~= q * 2**(e - 6)``.

    Error bound (step = 2**(e-6), the block's power-of-two quantum): ``|x - deq| <= step/2`` for
    every element that does not saturate; the block maximum may saturate (|x| * 2**(6-e) in
    [127.5, 128) rounds to 128 and clamps to 127), so over all elements ``|x - deq| <= step``.
    Scaling by powers of two is exact, so there is no further float rounding (barring underflow).
    """
    *lead, k = x.shape
    if k % block:
        raise ValueError(f"last dim {k} is not a multiple of the MX block {block}")
    g = x.float().reshape(*lead, k // block, block)
    amax = g.abs().amax(-1)
    _, ex = torch.frexp(amax)  # amax = m * 2**ex with m in [0.5, 1) -> floor(log2 amax) = ex - 1
    e = torch.where(amax > 0, ex - 1, torch.full_like(ex, MX_EXP_MIN)).clamp_(MX_EXP_MIN, MX_EXP_MAX)
    step = torch.exp2((e - MX_ELEM_FRAC_BITS).float()).unsqueeze(-1)  # exact, subnormal for e < -120
    q = torch.round(g / step).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(*lead, k), e.to(torch.int16)


def dequantize_mxint8(q: torch.Tensor, e: torch.Tensor, block: int = MX_BLOCK) -> torch.Tensor:
    """``q * 2**(e - 6)`` per block -> float32, exact (power-of-two scaling of int8 values)."""
    *lead, k = q.shape
    g = q.reshape(*lead, k // block, block).float()
    return (g * torch.exp2((e.float() - MX_ELEM_FRAC_BITS).unsqueeze(-1))).reshape(*lead, k)
