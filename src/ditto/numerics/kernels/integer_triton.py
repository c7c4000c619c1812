"""Triton kernels of the `integer` mode for GPUs: per-row int8 quantisation, and the int8 GEMM with
the linear epilogue fused (a linear is these two launches instead of some twenty torch ops).

One kernel computes what `IntLinear.epilogue(int8_matmul(q, w8), a16, sa)` computes, bit for bit,
for one linear or several side by side (FusedIntLinear: every column carries its own part's
multiplier, bias, shift and limit):

    acc[t, n] = sum_k q[t, k] * w8[n, k]                         int32, exact (|acc| <= K * 127^2)
    y = acc * a16[t] * m[n]                                      int64, < 2^62 (checked at setup)
    y = (y + 2^(sh - 1)) >> sh,   sh = shift[n] - sa[t]          one rounding, half up
    y = clamp(y + bias[n], -limit[n] + 1, limit[n] - 1)          -> int32

Integer sums are exact in any order, so the tile shapes and the K split cannot change a bit: the
GPU's result is the CPU's (the C kernels, and the torch ops they are checked against). It saves
the torch formulation's round trips through memory: the int32 accumulator, and four int64
(T, N) temporaries of the epilogue, per linear.

Used on CUDA tensors when Triton imports. The test suite runs it on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1 when the kernel is first used), against the torch ops and
the C kernels; $DITTO_INT_TRITON=1 additionally routes a CPU model's linears through it there,
so a whole model can be checked through the kernel without a GPU.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch

from ditto.numerics.kernels.integer_ops import ISQRT_STEPS

TRITON_ENV = "DITTO_INT_TRITON"  # "1": CPU tensors take the kernel too (only under TRITON_INTERPRET=1)
tl = None  # triton.language once _kernel() has imported it (the kernel's body names it)


@cache
def _triton():
    """(triton, triton.language), imported at first need (not on a CPU run's path), or None."""
    try:
        import triton
        import triton.language as tl
    except ImportError:  # no Triton: the torch ops serve every device
        return None
    return triton, tl


def available() -> bool:
    return _triton() is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def applies(x: torch.Tensor) -> bool:
    """Whether a linear on `x` runs this kernel: CUDA with Triton, or a CPU under the interpreter when asked."""
    if x.device.type == "cuda":
        return not interpreted() and available()
    return x.device.type == "cpu" and os.environ.get(TRITON_ENV, "0") == "1" and interpreted() and available()


def _gemm_epilogue_kernel(
    q_ptr,  # int8 (M, K)
    w_ptr,  # int8 (N, K)
    a16_ptr,  # int64 (M,)
    sa_ptr,  # int64 (M,)
    m_ptr,  # int64 (N,)
    b_ptr,  # int64 (N,)
    shift_ptr,  # int64 (N,)
    lim_ptr,  # int64 (N,)
    y_ptr,  # int32 (M, N)
    M,
    N,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(q_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)  # (BM, BK) x (BK, BN), exact
    a16 = tl.load(a16_ptr + rm, mask=rm < M, other=1)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0)
    m = tl.load(m_ptr + rn, mask=rn < N, other=0)
    bias = tl.load(b_ptr + rn, mask=rn < N, other=0)
    shift = tl.load(shift_ptr + rn, mask=rn < N, other=0)
    lim = tl.load(lim_ptr + rn, mask=rn < N, other=1)
    y = acc.to(tl.int64) * a16[:, None] * m[None, :]
    sh = shift[None, :] - sa[:, None]  # in [0, 62]
    one = tl.full((BM, BN), 1, tl.int64)
    y = (y + ((one << sh) >> 1)) >> sh  # arithmetic shift: floor, as torch's on int64
    y = y + bias[None, :]
    y = tl.minimum(tl.maximum(y, -lim[None, :] + 1), lim[None, :] - 1)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(tl.int32), mask=mask)


def _quantize_rows_kernel(
    x_ptr,  # int32 or int64 (M, K), rows of stride K
    q_ptr,  # int8 (M, K)
    a16_ptr,  # int64 (M,)
    sa_ptr,  # int64 (M,)
    K,
    BK: tl.constexpr,
):
    """integer_ops.quantize_rows for one row per program: amax, sa = max(0, bit_length(amax) - 15),
    a16 = max(1, ceil(amax / 2^sa)), R = (127 * 2^38 + a16 / 2) // a16, q = clamp(round_half_up(x * R /
    2^(38 + sa)), -127, 127)."""
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * K
    rk = tl.arange(0, BK)
    amax = tl.zeros((BK,), dtype=tl.int64)
    for k0 in range(0, K, BK):
        x = tl.load(base + k0 + rk, mask=k0 + rk < K, other=0).to(tl.int64)
        amax = tl.maximum(amax, tl.abs(x))
    top = tl.max(amax, axis=0)
    bits = tl.arange(0, 64).to(tl.int64)
    powers = tl.full((64,), 1, tl.int64) << tl.minimum(bits, 62)  # 2^0 .. 2^62 (the last two repeat 2^62)
    length = tl.sum(((powers <= top) & (bits < 63)).to(tl.int64), axis=0)  # bit_length(top): top < 2^63
    sa = tl.maximum(length - 15, 0)
    one = tl.full((), 1, tl.int64)
    a16 = tl.maximum((top + (one << sa) - 1) >> sa, 1)
    recip = ((127 << 38) + (a16 >> 1)) // a16
    e = 38 + sa
    half = (one << e) >> 1
    for k0 in range(0, K, BK):
        x = tl.load(base + k0 + rk, mask=k0 + rk < K, other=0).to(tl.int64)
        q = (x * recip + half) >> e
        q = tl.minimum(tl.maximum(q, -127), 127)
        tl.store(q_ptr + row.to(tl.int64) * K + k0 + rk, q.to(tl.int8), mask=k0 + rk < K)
    tl.store(a16_ptr + row, a16)
    tl.store(sa_ptr + row, sa)


def _rmsnorm_kernel(
    x_ptr,  # int32 or int64 (M, D)
    gm_ptr,  # int64 (D,)
    y_ptr,  # int32 (M, D)
    D,
    b,  # (61 - ceil(log2 D)) // 2
    eps_term,  # min(eps_int * D, 2^60)
    gamma_e,
    left,  # the output shift: max(0, shift) exact left ...
    right,  # ... and max(0, -shift) rounding right
    BK: tl.constexpr,
    STEPS: tl.constexpr,  # integer_ops.ISQRT_STEPS
):
    """integer_ops.rmsnorm_int (and IntRMSNorm's output shift) for one row per program, step for step."""
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * D
    rk = tl.arange(0, BK)
    one = tl.full((), 1, tl.int64)
    bits = tl.arange(0, 64).to(tl.int64)
    powers = tl.full((64,), 1, tl.int64) << tl.minimum(bits, 62)
    acc = tl.zeros((BK,), dtype=tl.int64)
    for k0 in range(0, D, BK):
        x = tl.load(base + k0 + rk, mask=k0 + rk < D, other=0).to(tl.int64)
        acc = tl.maximum(acc, tl.abs(x))
    amax = tl.max(acc, axis=0)
    sh = tl.maximum(tl.sum(((powers <= amax) & (bits < 63)).to(tl.int64), axis=0) - b, 0)
    half_sh = (one << sh) >> 1
    acc = tl.zeros((BK,), dtype=tl.int64)
    for k0 in range(0, D, BK):
        x = tl.load(base + k0 + rk, mask=k0 + rk < D, other=0).to(tl.int64)
        xs = (x + half_sh) >> sh
        acc += xs * xs
    ss = tl.maximum(tl.sum(acc, axis=0) + (eps_term >> (2 * sh)), 1)
    u = tl.maximum((62 - tl.sum(((powers <= ss) & (bits < 63)).to(tl.int64), axis=0)) >> 1, 0)
    n = ss << (2 * u)
    r = one << ((tl.sum(((powers <= n) & (bits < 63)).to(tl.int64), axis=0) + 1) >> 1)
    for _ in range(STEPS):
        r = tl.minimum(r, (r + n // r) >> 1)
    inv = (one << 62) // r
    k1 = tl.maximum(tl.sum(((powers <= (amax >> sh)) & (bits < 63)).to(tl.int64), axis=0) - 5, 0)
    shift = 62 + gamma_e - u - k1
    pre = tl.maximum(shift - 62, 0)
    e = shift - pre
    for k0 in range(0, D, BK):
        mask = k0 + rk < D
        x = tl.load(base + k0 + rk, mask=mask, other=0).to(tl.int64)
        gm = tl.load(gm_ptr + k0 + rk, mask=mask, other=0)
        xs = (x + half_sh) >> sh
        t = (xs * inv + ((one << k1) >> 1)) >> k1
        t = (t + ((one << pre) >> 1)) >> pre
        y = (t * gm + ((one << e) >> 1)) >> e
        y = ((y << left) + ((one << right) >> 1)) >> right  # the output shift: exact left or rounding right
        tl.store(y_ptr + row.to(tl.int64) * D + k0 + rk, y.to(tl.int32), mask=mask)


_COMPILED: dict[tuple[str, bool], object] = {}


def _kernel(fn=_gemm_epilogue_kernel):
    """A kernel, decorated at first use (interpreted or compiled, as TRITON_INTERPRET says then): a
    process that imports ditto before a test sets the variable still gets the interpreter."""
    key = (fn.__name__, interpreted())
    if key not in _COMPILED:
        triton, tl = _triton()
        globals()["tl"] = tl  # the kernels' source names `tl`; Triton resolves it from this module
        _COMPILED[key] = triton.jit(fn)
    return _COMPILED[key]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`integer_ops.quantize_rows` of integer rows x (M, K) (|x| < 2^31) as one kernel: q int8 (M, K),
    a16 and sa int64 (M, 1), the same bits."""
    if not available():
        raise RuntimeError("integer_triton: Triton is not installed")
    if x.dim() != 2 or x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"quantize_rows: integer (M, K) rows expected, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    a16 = torch.empty(m, 1, dtype=torch.int64, device=x.device)
    sa = torch.empty(m, 1, dtype=torch.int64, device=x.device)
    if m and k:
        _kernel(_quantize_rows_kernel)[(m,)](x, q, a16, sa, k, BK=min(1024, 1 << (k - 1).bit_length()))
    elif m:  # no inputs: what quantize_rows gives a zero row
        a16.fill_(1)
        sa.zero_()
    return q, a16, sa


def gemm_epilogue(
    q: torch.Tensor,
    w8: torch.Tensor,
    a16: torch.Tensor,
    sa: torch.Tensor,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """q int8 (M, K) from quantize_rows with its a16, sa (M, 1); w8 int8 (N, K); params = (m, bias,
    shift, limit), int64 (N,) each (`column_params`). Returns int32 (M, N)."""
    if not available():
        raise RuntimeError("integer_triton: Triton is not installed")
    triton = _triton()[0]
    m_, k = q.shape
    n = w8.shape[0]
    if w8.shape[1] != k or q.dtype != torch.int8 or w8.dtype != torch.int8:
        raise ValueError(f"gemm_epilogue: q {tuple(q.shape)} {q.dtype}, w8 {tuple(w8.shape)} {w8.dtype}")
    y = torch.empty(m_, n, dtype=torch.int32, device=q.device)
    if m_ == 0 or n == 0:
        return y
    bm = 16 if m_ <= 16 else 64
    bn, bk = 64, 64
    grid = (triton.cdiv(m_, bm), triton.cdiv(n, bn))
    _kernel()[grid](
        q.contiguous(),
        w8.contiguous(),
        a16.reshape(-1).to(torch.int64).contiguous(),
        sa.reshape(-1).to(torch.int64).contiguous(),
        *(p.contiguous() for p in params),
        y,
        m_,
        n,
        k,
        BM=bm,
        BN=bn,
        BK=bk,
    )
    return y


def column_params(parts, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(m, bias, shift, limit) per output column, int64 (N,) each, from IntLinear-like parts (each with
    .m (n,), .bias (n,) or None, .shift and .limit ints), side by side in the parts' order."""
    ms, biases, shifts, limits = [], [], [], []
    for p in parts:
        n = p.m.shape[0]
        ms.append(p.m.long())
        biases.append(p.bias.long() if p.bias is not None else torch.zeros(n, dtype=torch.long, device=p.m.device))
        shifts.append(torch.full((n,), p.shift, dtype=torch.long, device=p.m.device))
        limits.append(torch.full((n,), p.limit, dtype=torch.long, device=p.m.device))
    return tuple(torch.cat(t).to(device) for t in (ms, biases, shifts, limits))


def rmsnorm(x: torch.Tensor, gamma_m: torch.Tensor, gamma_e: int, eps_int: int, out_shift: int) -> torch.Tensor:
    """IntRMSNorm's torch ops (`integer_ops.rmsnorm_int`, then the output shift) as one kernel: int32 rows
    x (M, D) (|x| < 2^31) -> int32 (M, D), the same bits."""
    if not available():
        raise RuntimeError("integer_triton: Triton is not installed")
    if x.dim() != 2 or x.dtype not in (torch.int32, torch.int64) or gamma_m.shape != (x.shape[1],):
        raise ValueError(f"rmsnorm: integer (M, D) rows and (D,) gains expected, got {tuple(x.shape)}")
    x = x.contiguous()
    m, d = x.shape
    y = torch.empty(m, d, dtype=torch.int32, device=x.device)
    if m and d:
        b = (61 - math.ceil(math.log2(d))) // 2
        eps_term = min(eps_int * d, 1 << 60)
        gm = gamma_m.to(device=x.device, dtype=torch.int64).contiguous()
        bk = min(1024, 1 << (d - 1).bit_length())
        left, right = max(0, out_shift), max(0, -out_shift)
        _kernel(_rmsnorm_kernel)[(m,)](x, gm, y, d, b, eps_term, gamma_e, left, right, BK=bk, STEPS=ISQRT_STEPS)
    return y
