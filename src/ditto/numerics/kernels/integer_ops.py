"""Integer-only kernels for the `integer` numerics mode (determinism level `exact`).

Every op here takes and returns integer tensors and uses only integer add, multiply, shift,
compare, gather and (exact, floor) integer division at run time. Integer arithmetic is exact
and associative, so the result does not depend on thread count, reduction order, batch
composition or device, as long as nothing overflows; each op states its bounds and checks them
(`set_bound_checks(False)` turns the checks off once a configuration is proven).

Floats appear only at setup time (`dyadic`, table construction, `temperature_multiplier`), and
the lookup tables are built with Python's `decimal` module (correctly rounded), so they are the
same on every machine.

Devices. The same ops run on a CPU and on an accelerator (CUDA) with the same bits: integer ops are
exact anywhere. Only the GEMMs need care: int8 x int8 -> int32 goes through torch._int_mm on both
(zero-padded on an accelerator to its shape rules: M > 16, K and N multiples of 8, which adds zeros
to no sum), and the small batched GEMMs of attention (`_bmm_exact`), which CPUs run in int32, run
in float64 on an accelerator (CUDA has no integer batched GEMM): every product and partial sum
there is an integer below 2^53, so float64 holds each one exactly and any summation order gives
the same integer. `accelerator_path(t)` says which formulation a tensor takes; $DITTO_INT_ACCELERATOR_PATH=1
makes a CPU take the accelerator's (and leaves ditto's C kernels off), which is how the test suite
checks on every commit, without a GPU, that the GPU's formulation gives the CPU's bits.

Fixed-point notation: "Q.F" means an integer n standing for n / 2^F. "dyadic (m, e)" means the
real factor m / 2^e. Rounding is always half-up: (x + 2^(e-1)) >> e == floor(x / 2^e + 0.5).

Formats and bounds at a glance (error bounds are measured in tests/test_integer_ops.py):
  requantise     int64 (x*m + 2^(e-1)) >> e; |x|*|m| + 2^(e-1) < 2^63 checked
  quantize_rows  int32 row -> int8 q with x ~= q * a16 * 2^sa / 127, a16 < 2^15+1; |q - x*127/amax| <= 0.5
  int8_matmul    int8 (M,K) x int8 (N,K)^T -> exact int32 (M,N); K < 2^17 so |acc| < 2^31
  rmsnorm_int    int32 -> Q.out_frac int32; rel. error < 2^-20 plus 1 LSB
  exp2/exp       Q.F input -> Q30 output; rel. error < 1e-7 plus 1 LSB
  softmax_int    Q.F scores -> probabilities Q.B (rows sum to 2^B +- n); |p - p_ref| <= 1e-6 + 2^-B
  sigmoid/silu/gelu_tanh  Q.F in -> Q.F out; |err| <= 1 LSB + 2e-7 * |x|
  rope_int       int32 x, Q1.14 tables -> int32; |err| <= 0.5 + 1.5 * 2^-14 * max|x|
  log2_fixed     int64 n > 0 -> Q30 log2(n); |err| < 2e-8
  gumbel_noise_int  SplitMix64 bits -> Gumbel noise Q24; |err| < 2e-6 vs float64 -ln(-ln u)
"""

from __future__ import annotations

import json
import math
import os
from decimal import Decimal, getcontext
from fractions import Fraction
from functools import cache
from pathlib import Path

import torch

from ditto.sampling import noise_bits

ACCELERATOR_ENV = "DITTO_INT_ACCELERATOR_PATH"  # "1": a CPU computes as an accelerator does (tests, audits)
I64_MAX = (1 << 63) - 1
ISQRT_STEPS = 8  # Newton steps of isqrt (5 suffice for every n < 2^62; see isqrt)
Q30 = 30
NOISE_FRAC = 24  # Gumbel noise format: Q.24
_CHECKS = True


def set_bound_checks(enabled: bool) -> None:
    """Turn the run-time overflow assertions on (default) or off."""
    global _CHECKS
    _CHECKS = bool(enabled)


def _absmax(x) -> int:
    if isinstance(x, int):
        return abs(x)
    return int(x.abs().max()) if x.numel() else 0


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise OverflowError(f"integer kernel bound violated: {what}")


# ----------------------------------------------------------------------------- dyadic scales
def dyadic(scale: float, mbits: int = 31) -> tuple[int, int]:
    """Setup-time: the dyadic (m, e) with m / 2^e ~= scale, 2^(mbits-1) <= m < 2^mbits, e >= 0.

    From frexp: scale = frac * 2^exp, m = round(frac * 2^mbits), e = mbits - exp. Relative error
    <= 2^-mbits. If e would be negative (huge scales) m is shifted up instead (exact); a scale
    so small that e > 62 loses mantissa bits (m shrinks) so that shifts stay below 63.
    """
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"dyadic() needs a positive finite scale, got {scale!r}")
    frac, exp = math.frexp(scale)
    m, e = round(frac * (1 << mbits)), mbits - exp
    if m == 1 << mbits:  # frac rounded up to 1.0
        m, e = m >> 1, e - 1
    if e < 0:
        return m << -e, 0
    if e > 62:
        m, e = (m + (1 << (e - 63))) >> (e - 62), 62
    return m, e


def dyadic_tensor(scales: torch.Tensor, mbits: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised `dyadic`: int64 tensors (m, e) equal, element for element, to dyadic(float(s), mbits)."""
    s = torch.as_tensor(scales, dtype=torch.float64)
    if not bool(((s > 0) & torch.isfinite(s)).all()):
        raise ValueError("dyadic_tensor() needs positive finite scales")
    frac, exp = torch.frexp(s)
    m = torch.round(frac * float(1 << mbits)).long()  # frac in [0.5, 1): exact product, round half-even like round()
    e = mbits - exp.long()
    top = m == (1 << mbits)
    m, e = torch.where(top, m >> 1, m), torch.where(top, e - 1, e)
    neg = e < 0
    m, e = torch.where(neg, m << (-e).clamp(min=0), m), e.clamp(min=0)
    big = e > 62
    k = (e - 62).clamp(0, 62)
    rounded = torch.where(e - 62 > 62, 0, (m + ((torch.ones_like(m) << k) >> 1)) >> k)  # m < 2^31: 0 beyond
    return torch.where(big, rounded, m), torch.where(big, torch.full_like(e, 62), e)


def _round_term(e):
    if isinstance(e, int):
        return (1 << e) >> 1
    return (torch.ones_like(e) << e) >> 1


def requantise(x: torch.Tensor, m, e) -> torch.Tensor:
    """int64 (x * m + 2^(e-1)) >> e, i.e. round-half-up of x * m / 2^e.

    m, e: Python ints or int64 tensors broadcastable to x (per row / per column factors), e >= 0.
    Exact: equals floor(x * m / 2^e + 0.5) for every input whose product fits int64 (checked).
    """
    x = x.long()
    if _CHECKS:
        bound = _absmax(x) * _absmax(m) + (1 << max(_absmax(e) - 1, 0))
        _check(bound <= I64_MAX, f"requantise |x*m| = {bound} >= 2^63")
        _check(0 <= _absmax(e) <= 62 if isinstance(e, int) else bool((e >= 0).all()), "requantise shift e < 0")
        _check(_absmax(e) <= 62, "requantise shift e > 62")
    return (x * m + _round_term(e)) >> e


def rshift_round(x: torch.Tensor, e) -> torch.Tensor:
    """Round-half-up x / 2^e for e >= 0 (int or tensor)."""
    return (x + _round_term(e)) >> e


def clamp_int8(x: torch.Tensor) -> torch.Tensor:
    """Saturate to the symmetric int8 range [-127, 127] and cast."""
    return x.clamp(-127, 127).to(torch.int8)


@cache
def _pow2(device: str) -> torch.Tensor:
    return torch.tensor([1 << i for i in range(63)], dtype=torch.int64, device=device)


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Elementwise bit length of nonnegative int64 (0 -> 0, 1 -> 1, 2^k -> k+1): count of powers of two <= x."""
    x = x.long()
    return torch.searchsorted(_pow2(str(x.device)), x.contiguous(), right=True)


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """Elementwise floor(sqrt(n)) for int64 0 <= n < 2^62, by Newton's method from above.

    Starts at 2^ceil(bits/2), within a factor 2 above sqrt(n); x <- min(x, (x + n // x) >> 1) falls
    monotonically to the floor root and stays there. The relative error squares each step (1, 1/4,
    1/40, 3e-4, 5e-8, 1e-15: below one unit of a root < 2^31 after five), so ISQRT_STEPS = 8 steps
    reach it for every n < 2^62 (the worst case, found by search, takes 5) with no data-dependent
    exit: no host synchronisation on a GPU. Exact (matches math.isqrt; tests/test_integer_ops.py).
    """
    n = n.long()
    if _CHECKS:
        _check(bool((n >= 0).all()) and _absmax(n) < (1 << 62), "isqrt needs 0 <= n < 2^62")
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)
    safe_n = n.clamp(min=1)
    for _ in range(ISQRT_STEPS):
        x = torch.minimum(x, (x + torch.div(safe_n, x, rounding_mode="floor")) >> 1)
    return torch.where(n == 0, torch.zeros_like(x), x)


# ----------------------------------------------------------------------------- tables
TABLES_FILE = Path(__file__).with_name("fixed_tables.json")  # compute_tables(), shipped: 0.1 s less at start


def compute_tables() -> dict[str, list[int]]:
    """EXP2: round(2^(-i/1024) * 2^30), i = 0..1024; LOG2: round(log2(1 + i/4096) * 2^30), i = 0..4096.

    Computed with `decimal` at 40 digits (exp/ln are correctly rounded there), so bit-identical
    everywhere; the package ships the result (TABLES_FILE, checked against this in the tests).
    """
    getcontext().prec = 40
    ln2, one, half = Decimal(2).ln(), Decimal(1 << Q30), Decimal("0.5")
    exp2 = [int((Decimal(-i) / 1024 * ln2).exp() * one + half) for i in range(1025)]
    log2 = [int((1 + Decimal(i) / 4096).ln() / ln2 * one + half) for i in range(4097)]
    return {"exp2": exp2, "log2": log2}


@cache
def _tables(device: str) -> dict[str, torch.Tensor]:
    """The shipped tables as int64 tensors on `device`."""
    tables = json.loads(TABLES_FILE.read_text())
    return {name: torch.tensor(tables[name], dtype=torch.int64, device=device) for name in ("exp2", "log2")}


LOG2E_Q30 = round(math.log2(math.e) * (1 << Q30))  # 1549082005, exact integer constant
LN2_Q26 = round(math.log(2) * (1 << 26))  # ln 2 in Q26: x(Q30) * LN2_Q26 < 2^63 for |x| < 2^36


def exp2_neg_fixed(t: torch.Tensor, frac: int) -> torch.Tensor:
    """2^(-t / 2^frac) in Q30 for t >= 0 in Q.frac (int64). Relative error < 6e-8, plus 1 LSB.

    Integer part k shifts; the fractional part indexes a 1025-entry table (top 10 bits) and
    interpolates linearly with the next bits.
    """
    tab = _tables(str(t.device))["exp2"]
    t = t.long()
    k = (t >> frac).clamp(max=62)
    f = t & ((1 << frac) - 1)
    if frac >= 10:
        idx, w, wb = f >> (frac - 10), f & ((1 << (frac - 10)) - 1), frac - 10
    else:
        idx, w, wb = f << (10 - frac), torch.zeros_like(f), 0
    lo, hi = tab[idx], tab[(idx + 1).clamp(max=1024)]
    val = lo + rshift_round((hi - lo) * w, wb)
    return rshift_round(val, k)


def exp_neg_fixed(x: torch.Tensor, frac: int) -> torch.Tensor:
    """exp(x) in Q30 for x <= 0 in Q.frac, |x| < 2^32 (int64): t = -x * log2(e), then exp2_neg_fixed."""
    if _CHECKS:
        _check(_absmax(x) < (1 << 32), "exp_neg_fixed |x| >= 2^32")
    t = rshift_round((-x.long()) * LOG2E_Q30, Q30 - 14)  # -x * log2(e) in Q.(frac + 14), < 2^63
    return exp2_neg_fixed(t, frac + 14)


def log2_fixed(n: torch.Tensor) -> torch.Tensor:
    """log2(n) in Q30 for int64 n >= 1. |error| < 2e-8 (table of 4097 entries, 20-bit interpolation)."""
    tab = _tables(str(n.device))["log2"]
    n = n.long()
    top = bit_length(n) - 1  # position of the leading bit
    norm = n << (62 - top)  # in [2^62, 2^63)
    mant = norm - (1 << 62)
    idx, w = mant >> 50, (mant >> 30) & ((1 << 20) - 1)
    lo, hi = tab[idx], tab[(idx + 1).clamp(max=4096)]
    return (top << Q30) + lo + rshift_round((hi - lo) * w, 20)


# ----------------------------------------------------------------------------- GEMM + quantisation
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row dynamic int8 quantisation of integers |x| < 2^31, integer arithmetic only.

    Returns (q int8 (..., K), a16 int64 (..., 1), sa int64 (..., 1)) with
        x ~= q * a16 * 2^sa / 127,   a16 = ceil(amax / 2^sa) <= 2^15,  sa = max(0, bits(amax) - 15).
    q = round(x * 127 / (a16 * 2^sa)) via an integer reciprocal R = round(127 * 2^38 / a16);
    |q - x * 127 / (a16 * 2^sa)| <= 0.5 + 2^-20, |q| <= 127. A zero row gives q = 0, a16 = 1.
    """
    x = x.long()
    if _CHECKS:
        _check(_absmax(x) < (1 << 31), "quantize_rows needs |x| < 2^31")
    amax = x.abs().amax(dim=-1, keepdim=True)
    sa = (bit_length(amax) - 15).clamp(min=0)
    a16 = ((amax + (1 << sa) - 1) >> sa).clamp(min=1)
    recip = torch.div((127 << 38) + (a16 >> 1), a16, rounding_mode="floor")
    q = rshift_round(x * recip, 38 + sa)  # |x * recip| <= 127 * 2^(38 + 16) < 2^61
    return clamp_int8(q), a16, sa


def accelerator_path(t: torch.Tensor) -> bool:
    """Whether ops on `t` take the accelerator formulation: off the CPU, or with $DITTO_INT_ACCELERATOR_PATH=1."""
    return t.device.type != "cpu" or os.environ.get(ACCELERATOR_ENV, "") not in ("", "0")


def _pad_to(x: torch.Tensor, dim: int, multiple: int, minimum: int = 0) -> torch.Tensor:
    size = x.shape[dim]
    target = max(-(-size // multiple) * multiple, minimum)
    if target == size:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, target - size]
    return torch.nn.functional.pad(x, pad)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ w.T for int8 a (M, K) and int8 w (N, K): torch._int_mm (AMX/VNNI on CPU).

    |acc| <= K * 127^2 < 2^31 for K < 2^17 (checked). On CUDA the operands are zero-padded to
    _int_mm's shape rules (M > 16, K and N multiples of 8); zero padding does not change the sums.
    """
    M, K = a.shape
    N = w.shape[0]
    if _CHECKS:
        _check(K < (1 << 17), f"int8_matmul K={K} >= 2^17 could overflow int32")
        _check(a.dtype == torch.int8 and w.dtype == torch.int8, "int8_matmul needs int8 operands")
    if accelerator_path(a):
        a = _pad_to(_pad_to(a, 1, 8), 0, 8, minimum=17)
        w = _pad_to(_pad_to(w, 1, 8), 0, 8)
    return torch._int_mm(a.contiguous(), w.contiguous().t())[:M, :N]


def int_matmul_limbs(a: torch.Tensor, w: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Exact int64 a @ w.T for integer a (M, K) with |a| < 2^bits and int8 w (N, K), by 7-bit limbs.

    a = sum_j a_j * 128^j with a_j in [0, 127] (the top limb keeps the sign when `signed`), one
    int8 GEMM per limb: ceil((bits + signed) / 7) GEMMs. Used for P.V (probabilities > 8 bits).
    """
    a = a.long()
    if _CHECKS:
        _check(_absmax(a) < (1 << bits), f"int_matmul_limbs |a| >= 2^{bits}")
        _check(signed or bool((a >= 0).all()), "int_matmul_limbs signed=False needs a >= 0")
    n_limbs = -(-(bits + int(signed)) // 7)
    out = None
    for j in range(n_limbs):
        limb = (a >> (7 * j)) if j == n_limbs - 1 else ((a >> (7 * j)) & 127)
        part = int8_matmul(limb.to(torch.int8), w).long() << (7 * j)
        out = part if out is None else out + part
    return out


# ----------------------------------------------------------------------------- RMSNorm
def rmsnorm_int(x: torch.Tensor, gamma_m: torch.Tensor, gamma_e: int, eps_int: int) -> torch.Tensor:
    """Integer RMSNorm: y = x / sqrt(mean(x^2) + eps) * gamma, output in Q.out (int64).

    x: (..., D) ints |x| < 2^31 at any scale s_x; eps_int = round(eps / s_x^2).
    gamma_m (D,) / 2^gamma_e is dyadic(gamma_c * sqrt(D) / s_out) per channel (|gamma_m| < 2^24).
    Steps: per-row pre-shift sh so that sum((x >> sh)^2) < 2^62; left-normalise by u so
    r = isqrt(ss << 2u) has >= 30 bits; inv = 2^62 // r; y = x_s * inv * gamma_m >> (62 + gamma_e - u),
    in two steps so that every product stays below 2^62. eps_int is an integer in units of s_x^2.
    Relative error < 2^-20 plus 1 LSB of the output.
    """
    x = x.long()
    D = x.shape[-1]
    if _CHECKS:
        _check(_absmax(x) < (1 << 31), "rmsnorm_int needs |x| < 2^31")
        _check(_absmax(gamma_m) < (1 << 24), "rmsnorm_int gamma_m >= 2^24")
    b = (61 - math.ceil(math.log2(D))) // 2  # |x_s| <= 2^b -> D * x_s^2 < 2^61
    amax = x.abs().amax(dim=-1, keepdim=True)
    sh = (bit_length(amax) - b).clamp(min=0)
    xs = rshift_round(x, sh)
    eps_term = min(eps_int * D, 1 << 60)
    ss = (xs * xs).sum(dim=-1, keepdim=True) + (eps_term >> (2 * sh))
    ss = ss.clamp(min=1)
    u = ((62 - bit_length(ss)) >> 1).clamp(min=0)
    r = isqrt(ss << (2 * u))  # ~ sqrt(ss) * 2^u, in [2^30, 2^31)
    inv = torch.div(torch.full_like(r, 1 << 62), r, rounding_mode="floor")  # < 2^33
    k1 = (bit_length(amax >> sh) - 5).clamp(min=0)  # keep xs * inv >> k1 < 2^38 (then * gamma_m < 2^62)
    t = rshift_round(xs * inv, k1)  # |xs * inv| < 2^(b + 33) <= 2^62
    shift = 62 + gamma_e - u - k1
    pre = (shift - 62).clamp(min=0)  # tiny gains: shift part of the way first so every shift stays <= 62
    return requantise(rshift_round(t, pre), gamma_m, shift - pre)


def rmsnorm_params(gamma, out_frac: int, mbits: int = 23) -> tuple[torch.Tensor, int]:
    """Setup-time: (gamma_m, gamma_e) for rmsnorm_int from a float gain (D,) (offset already added).

    gamma_m = round(gamma * sqrt(D) * 2^(out_frac + gamma_e)) with one shift gamma_e chosen so that
    max |gamma_m| < 2^mbits (absolute precision 2^-mbits of the largest gain).
    """
    g = torch.as_tensor(gamma, dtype=torch.float64) * math.sqrt(len(gamma)) * 2.0**out_frac
    gmax = float(g.abs().max())
    if gmax == 0:
        return torch.zeros(len(gamma), dtype=torch.int64), 0
    gamma_e = mbits - math.frexp(gmax)[1]
    if gamma_e < 0 or gamma_e > 62:
        raise ValueError(f"rmsnorm_params: out_frac={out_frac} does not suit gains up to {gmax:.3g}")
    return torch.round(g * 2.0**gamma_e).to(torch.int64), gamma_e


# ----------------------------------------------------------------------------- softmax
def softmax_int(x: torch.Tensor, frac: int, out_bits: int = 20, mask: torch.Tensor | None = None):
    """Integer softmax over the last dim. x: int scores in Q.frac (|x| < 2^31); mask: True = keep.

    Returns probabilities in Q.out_bits (int64): e = exp(x - rowmax) in Q30, one integer
    reciprocal inv = 2^62 // sum(e), p = round(e * inv / 2^(62 - out_bits)). Masked entries are
    exactly 0 and do not affect the others (so padding and batch composition cannot change a
    row); a fully masked row gives zeros. |p / 2^B - p_ref| <= 2^-B + 1e-6; a row sums to
    2^B within +-(n/2 + 1).
    """
    x = x.long()
    neg = torch.full_like(x, -(1 << 40))
    xm = x if mask is None else torch.where(mask, x, neg)
    rowmax = xm.amax(dim=-1, keepdim=True)
    d = (xm - rowmax).clamp(min=-(1 << 31) + 1)
    e = exp_neg_fixed(d, frac)
    if mask is not None:
        e = torch.where(mask, e, torch.zeros_like(e))
    s = e.sum(dim=-1, keepdim=True)
    inv = torch.div(torch.full_like(s, 1 << 62), s.clamp(min=1), rounding_mode="floor")
    return rshift_round(e * inv, 62 - out_bits)  # e <= 2^30, inv <= 2^32


def log_softmax_int(x: torch.Tensor, frac: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Integer log-softmax in Q.frac: (x - max) - ln(sum exp(x - max)), via log2_fixed of the Q30 sum.

    |error| < 1e-6 + 2^-frac (absolute, natural-log units). Masked entries get -2^40.
    """
    x = x.long()
    neg = torch.full_like(x, -(1 << 40))
    xm = x if mask is None else torch.where(mask, x, neg)
    d = xm - xm.amax(dim=-1, keepdim=True)
    e = exp_neg_fixed(d.clamp(min=-(1 << 31) + 1), frac)
    if mask is not None:
        e = torch.where(mask, e, torch.zeros_like(e))
    lse = log2_fixed(e.sum(dim=-1, keepdim=True)) - (Q30 << Q30)  # log2(sum) in Q30, >= 0, < 2^36
    out = d - requantise(lse, LN2_Q26, 56 - frac)
    return out if mask is None else torch.where(mask, out, neg)


def _bmm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 batched a @ b for small integer operands whose sums fit int32: an int32 GEMM on a
    CPU, a float64 one on an accelerator (every product and partial sum an integer < 2^31 < 2^53:
    exact in float64 in any order)."""
    if accelerator_path(a):
        return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)
    return torch.matmul(a.to(torch.int32), b.to(torch.int32))


def attend_int(
    q: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    k: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    v: torch.Tensor,
    mask: torch.Tensor,
    score_m: int,
    score_e: int,
    score_frac: int = 16,
    prob_bits: int = 20,
) -> torch.Tensor:
    """Batched integer attention, exact, with kv heads as a batch dim.

    q = (q8 (B, Hkv, M, d) int8, qa16, qsa (B, Hkv, M, 1)) — M = queries x heads of one kv group;
    k = (k8 (B, Hkv, L, d) int8, ka16, ksa (B, Hkv, L, 1)) from quantize_rows; v int8 (B, Hkv, L, d)
    with a static per-channel scale; mask (B, 1, M, L) True = visible. score = q.k * qa16 * ka16 *
    2^(qsa + ksa) * score_m / 2^score_e in Q.score_frac, where (score_m, score_e) = dyadic(attn_scale *
    s_q * s_k * 2^score_frac / 127^2, 18) (s_q, s_k: the int scales of q and k before quantize_rows);
    p = softmax_int (Q.prob_bits). Returns (B, Hkv, M, d) int64 = sum_j p_j v_j, in units of
    2^-prob_bits * s_v[channel]. Scores:
    |q.k| <= d * 127^2 (int32); P.V: sum_j p_j |v_j| <= (2^B + L) * 127 < 2^31 (int32 GEMM, exact).
    With B == 1 (a prefill chunk) the GEMMs run per kv head through torch._int_mm (P.V by 7-bit limbs).
    """
    q8, qa16, qsa = q
    k8, ka16, ksa = k
    B, H = q8.shape[:2]
    if B == 1:
        acc = torch.stack([int8_matmul(q8[0, h], k8[0, h]) for h in range(H)])[None].long()
    else:
        acc = _bmm_exact(q8, k8.transpose(-1, -2)).long()  # (B, Hkv, M, L)
    t = rshift_round(acc * qa16, 8) * ka16.transpose(-1, -2)  # < 2^(21 + 15 - 8 + 15) = 2^43
    sh = (score_e - 8) - qsa - ksa.transpose(-1, -2)
    x = requantise(t, score_m, sh).clamp_(-(1 << 31) + 1, (1 << 31) - 1)  # Q.score_frac
    p = softmax_int(x, score_frac, prob_bits, mask)
    if B == 1:
        outs = [int_matmul_limbs(p[0, h], v[0, h].T.contiguous(), prob_bits + 1, signed=False) for h in range(H)]
        return torch.stack(outs)[None]
    return _bmm_exact(p, v).long()


# ----------------------------------------------------------------------------- activations
def sigmoid_int(x: torch.Tensor, frac: int) -> torch.Tensor:
    """sigmoid(x) in Q30 for x in Q.frac: e = exp(-|x|) (Q30), s+ = 2^60 // (2^30 + e), mirrored for x < 0.

    |error| < 2e-7 (absolute, probability units).
    """
    x = x.long()
    e = exp_neg_fixed(-x.abs().clamp(max=(1 << 32) - 1), frac)
    pos = torch.div(torch.full_like(e, 1 << 60) + ((e + (1 << Q30)) >> 1), e + (1 << Q30), rounding_mode="floor")
    return torch.where(x >= 0, pos, (1 << Q30) - pos)


def silu_int(x: torch.Tensor, frac: int) -> torch.Tensor:
    """SiLU x * sigmoid(x), same format Q.frac in and out, |x| < 2^32. |err| <= 1 LSB + 2e-7 |x|."""
    return requantise(x.long(), sigmoid_int(x, frac), Q30)


_GELU_C = 0.044715
_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)  # gelu_tanh(x) = x * sigmoid(K (x + C x^3))


def gelu_tanh_int(x: torch.Tensor, frac: int) -> torch.Tensor:
    """GELU (tanh form) = x * sigmoid(K (x + 0.044715 x^3)), K = 2 sqrt(2/pi); Q.frac in and out.

    x is clamped to +-16 inside the polynomial only (where sigmoid has saturated below 2^-40).
    frac <= 24. |err| <= 1 LSB + 1e-6 |x|.
    """
    x = x.long()
    if _CHECKS:
        _check(frac <= 24, "gelu_tanh_int needs frac <= 24")
    xc = x.clamp(-(16 << frac), 16 << frac)
    cube = rshift_round(rshift_round(xc * xc, frac) * xc, frac)  # |cube| <= 2^(12 + frac)
    cm, ce = dyadic(_GELU_C, 20)
    km, ke = dyadic(_GELU_K, 24)
    z = requantise(xc + requantise(cube, cm, ce), km, ke)
    return requantise(x, sigmoid_int(z, frac), Q30)


# ----------------------------------------------------------------------------- RoPE
def rope_tables(inv_freq, max_pos: int, frac: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Setup-time: cos/sin tables (max_pos, d/2) in Q1.frac (int32), angle = pos * inv_freq (float64).

    Store them with the calibration (the libm cos/sin of another machine may round differently).
    """
    pos = torch.arange(max_pos, dtype=torch.float64)[:, None]
    ang = pos * torch.as_tensor(inv_freq, dtype=torch.float64)[None, :]
    scale = float(1 << frac)
    return (torch.round(torch.cos(ang) * scale).to(torch.int32), torch.round(torch.sin(ang) * scale).to(torch.int32))


def rope_int(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frac: int = 14):
    """Rotate-half RoPE on ints x (T, H, d), |x| < 2^31, with Q1.frac tables (max_pos, d/2).

    out1 = round((x1 c - x2 s) / 2^frac), out2 = round((x2 c + x1 s) / 2^frac), same scale as x.
    |err| <= 0.5 + 1.5 * 2^-frac * max|x| vs exact rotation.
    """
    x = x.long()
    half = x.shape[-1] // 2
    c = cos[positions].long()[:, None, :]  # (T, 1, d/2)
    s = sin[positions].long()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([rshift_round(x1 * c - x2 * s, frac), rshift_round(x2 * c + x1 * s, frac)], dim=-1)


# ----------------------------------------------------------------------------- sampling
def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel noise g = -ln(-ln u) in Q24 (int64) from 64-bit hashes, integer only.

    u = (2 * (bits >>> 2) + 1) / 2^63 (odd numerator: never 0 or 1); g in [-3.79, 43.7].
    A single uniform table in u cannot work (dg/du is unbounded at both ends), so g is composed
    from the integer log2 (table + interpolation):
      v = 1 - u >= 2^-8:  L2 = 63 - log2(n) = -log2(u);  g = -ln2 * (log2(L2) + log2(ln 2))
      v < 2^-8:           g = -ln v - v/2 - 5 v^2 / 24   (series of -ln(-ln(1 - v)), error < v^3)
    |g - g_float64| < 2e-6.
    """
    n = 2 * _srl(bits.long(), 2) + 1
    m = I64_MAX - n + 1  # 2^63 - n, v = m / 2^63
    log2_ln2 = round(math.log2(math.log(2)) * (1 << Q30))
    l2 = (63 << Q30) - log2_fixed(n)  # -log2(u), Q30
    mid = log2_fixed(l2.clamp(min=1)) - (Q30 << Q30) + log2_ln2  # log2(-ln u), Q30, |.| < 2^33
    g_mid = -requantise(mid, LN2_Q26, 26 + Q30 - NOISE_FRAC)
    nlv = requantise((63 << Q30) - log2_fixed(m.clamp(min=1)), LN2_Q26, 26 + Q30 - NOISE_FRAC)  # -ln v
    vq = m >> (63 - NOISE_FRAC)  # v in Q24
    g_tail = nlv - (vq >> 1) - (((vq * vq) >> NOISE_FRAC) * 5) // 24
    return torch.where(m >= (1 << 55), g_mid, g_tail)


def gumbel_noise_int(seed: int, sample_index: int, token_index: int, vocab_size: int) -> torch.Tensor:
    """Fixed-point Gumbel noise (V,) in Q24 for the same coordinates as ditto.sampling.gumbel_noise."""
    return gumbel_from_bits(noise_bits(seed, sample_index, token_index, vocab_size))


def temperature_multiplier(logit_scale: float, temperature: float) -> tuple[int, int]:
    """Setup-time, exact: (M, e) with logit_int * M ~= logit_int * logit_scale / T * 2^(24 + e).

    Computed with fractions.Fraction from the float inputs (exactly representable), so every machine
    gets the same M. M has 24 significant bits; e in [0, 31] is the left shift applied to the noise.
    """
    ratio = Fraction(logit_scale) / Fraction(temperature) * (1 << NOISE_FRAC)
    e = 0
    while ratio < (1 << 23) and e < 31:
        ratio *= 2
        e += 1
    return max(1, round(ratio)), e
