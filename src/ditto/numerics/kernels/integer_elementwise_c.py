"""Fused C kernels for the integer mode's elementwise chains (determinism level `exact`), bit-exact with torch.

Each kernel computes, row by row, exactly what a chain of `integer_ops` / `integer.py` torch ops
computes on int64 tensors; the torch code stays the reference and the fallback:

  quantize_rows      integer_ops.quantize_rows (int32 or int64 rows)
  linear_epilogue    IntLinear.epilogue for one or several fused parts (+ .to(int32), or the LM head's
                     exact float32 logit_int * 2^-frac)
  mlp_act_quantize   IntMLP: gate / up epilogues -> silu_int or gelu_tanh_int -> gate * up ->
                     rshift_round / << -> clamp -> quantize_rows for down_proj
  rmsnorm            IntRMSNorm: rmsnorm_int (isqrt included) -> output shift -> .to(int32)
  head_post          IntAttention per head: optional IntRMSNorm (q_norm / k_norm) -> rope_int -> quantize_rows
  requant_quantize   IntAttention's P.V requantise -> clamp -> quantize_rows for o_proj
  sigmoid            integer_ops.sigmoid_int alone (the activations' core; for tests)

Only integer arithmetic runs, with torch's int64 semantics spelled out: wrapping add / mul, an
arithmetic >> whose count outside [0, 63] acts as 63, a << whose count outside [0, 63] gives 0,
the round term (1 << e) >> 1 from a table, floor division of positive operands, clamp as
min(max(x, lo), hi), and the same fixed-point tables (exp2 from `integer_ops._tables`). One
division (sigmoid's 2^60 // d) runs in double precision and is then corrected to the exact
floor with the integer remainder. Every output element depends on its own row only and rows are
split over OpenMP threads, so the thread count, vectorisation and the machine cannot change a bit.

The C source is ditto/csrc/integer_elementwise.c (torch's int64 rules in csrc/ditto_int.h), compiled
at first use with the system C compiler (see `cbuild`); without one, or with DITTO_INT_DISABLE_KERNEL=1
(all integer kernels) or DITTO_INT_DISABLE_ELEMENTWISE=1 (these only), `kernel_available()` is
False and callers use the torch path. The wrappers check shapes, dtypes and parameter ranges
before any pointer reaches C and raise ValueError on a mismatch.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from dataclasses import dataclass

import torch

from ditto.numerics.kernels import integer_ops as iops
from ditto.numerics.kernels.cbuild import DEFAULT_FLAGS, CLibrary

__all__ = [
    "EpilogueParams",
    "gemv",
    "lib",
    "MLPParams",
    "NormParams",
    "head_post",
    "kernel_available",
    "kernel_status",
    "linear_epilogue",
    "mlp_act_quantize",
    "qkv_post",
    "quantize_rows",
    "requant_quantize",
    "res_norm_quant",
    "rmsnorm",
    "sigmoid",
]

DISABLE_ENV = "DITTO_INT_DISABLE_ELEMENTWISE"


def _setup(lib: ctypes.CDLL) -> str | None:
    if os.environ.get(DISABLE_ENV):
        return f"disabled by {DISABLE_ENV}"
    p, n, i, i64 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int64
    lib.ditto_quantize_i32.argtypes = [p, n, n, n, p, p, p]
    lib.ditto_quantize_i64.argtypes = [p, n, n, n, p, p, p]
    lib.ditto_quantize_i32.restype = lib.ditto_quantize_i64.restype = None
    lib.ditto_epilogue.argtypes = [p, n, n, n, p, p, p, p, n, p, p, p, p, p, p, ctypes.c_float]
    lib.ditto_epilogue.restype = None
    lib.ditto_sigmoid.argtypes = [p, n, i, p, p]
    lib.ditto_sigmoid.restype = None
    lib.ditto_mlp.argtypes = [p, n, n, n, p, p, p, p, p, p, p, i, i, p, i64, i64, p, p, p, p, p]
    lib.ditto_mlp.restype = ctypes.c_long
    lib.ditto_rmsnorm.argtypes = [p, n, n, n, p, i64, i64, i64, i64, p]
    lib.ditto_rmsnorm.restype = None
    lib.ditto_head_post.argtypes = [p, n, n, n, n, p, i64, i64, i64, i64, p, p, p, i64, p, p, p, p]
    lib.ditto_head_post.restype = ctypes.c_long
    lib.ditto_requant_quant.argtypes = [p, n, n, p, p, i64, i64, p, p, p, p]
    lib.ditto_requant_quant.restype = ctypes.c_long
    lib.ditto_res_norm_quant.argtypes = [n, n, p, n, p, p, p, p, p, p, p, p, p, p]
    lib.ditto_res_norm_quant.restype = ctypes.c_long
    lib.ditto_qkv_post.argtypes = [n, p, n, p, p, p, n, n, n, p, p, p, p, p, i64, p, p, p, p, p, p, p, p]
    lib.ditto_qkv_post.restype = ctypes.c_long
    lib.ditto_gemv_s8.argtypes = [p, p, p, n, n, p]
    lib.ditto_gemv_s8.restype = None
    lib.ditto_quant_weight.argtypes = [p, n, n, p, p, p, p]
    lib.ditto_quant_weight.restype = None
    lib.ditto_col_absmax.argtypes = [p, n, n, p]
    lib.ditto_col_absmax.restype = None
    return None


# -fno-trapping-math lets gcc if-convert (and so vectorise) the loop around sigmoid's double division;
# IEEE results are unchanged (no -ffast-math), and the kernels are integer-exact with or without it.
FLAGS = (*DEFAULT_FLAGS, "-fno-trapping-math")
_LIBRARY = CLibrary("integer_elementwise.c", "DITTO_INT_DISABLE_KERNEL", _setup, FLAGS)


def kernel_available() -> bool:
    """True when the compiled elementwise kernels are usable (builds them on first call)."""
    return _LIBRARY.load() is not None


def kernel_status() -> str:
    """'ok' or the reason the kernels are unavailable (for manifests / logs)."""
    return _LIBRARY.status()


def _lib() -> ctypes.CDLL:
    lib = _LIBRARY.load()
    if lib is None:
        raise RuntimeError(f"integer elementwise kernels unavailable: {_LIBRARY.error}")
    return lib


def lib() -> ctypes.CDLL:
    """The loaded library, for callers that pass checked, prebuilt arguments straight to C (integer_lean)."""
    return _lib()


class EpiStruct(ctypes.Structure):
    """C `Epi`: the pointers of an EpilogueParams (which keeps the tensors alive) and its part count."""

    _fields_ = [(f, ctypes.c_void_p) for f in ("m", "bias", "seg_end", "seg_shift", "seg_lo", "seg_hi")]
    _fields_ += [("nseg", ctypes.c_long)]


class NormStruct(ctypes.Structure):
    """C `Norm`: the integers of a NormParams (which keeps gamma_m alive)."""

    _fields_ = [("gm", ctypes.c_void_p)] + [(f, ctypes.c_int64) for f in ("ge", "eps_term", "b", "oshift")]


def _i64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.int64).contiguous()


def _check_cpu(*xs: torch.Tensor) -> None:
    if any(x.device.type != "cpu" for x in xs):
        raise ValueError("integer elementwise kernels: CPU tensors expected")


def _rows(x: torch.Tensor, dtypes: tuple[torch.dtype, ...], what: str) -> tuple[torch.Tensor, int]:
    """A 2-D (T, K) view of x with unit column stride, and its row stride (copies only when needed)."""
    if x.dtype not in dtypes or x.dim() != 2:
        raise ValueError(f"{what}: 2-D {dtypes} expected, got {x.dtype} {tuple(x.shape)}")
    _check_cpu(x)
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    return x, (x.stride(0) if x.shape[0] > 1 else x.shape[1])


def _oom(rc: int, what: str) -> None:
    if rc < 0:
        raise MemoryError(f"integer elementwise kernel {what}: scratch allocation failed")


# ----------------------------------------------------------------------------- quantize_rows
def _quantize_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_rows of a (T, K) int32 / int64 matrix: q (T, K) int8, a16 (T, 1), sa (T, 1) int64."""
    x, ld = _rows(x, (torch.int32, torch.int64), "quantize_rows")
    t, k = x.shape
    if k == 0:
        raise ValueError("quantize_rows: empty rows")
    q = torch.empty(t, k, dtype=torch.int8)
    a16, sa = torch.empty(t, 1, dtype=torch.int64), torch.empty(t, 1, dtype=torch.int64)
    fn = _lib().ditto_quantize_i32 if x.dtype == torch.int32 else _lib().ditto_quantize_i64
    fn(x.data_ptr(), t, k, ld, q.data_ptr(), a16.data_ptr(), sa.data_ptr())
    return q, a16, sa


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bit-exact `integer_ops.quantize_rows` of int32 / int64 x (..., K): q (..., K) int8, a16, sa (..., 1) int64."""
    lead = x.shape[:-1]
    q, a16, sa = _quantize_2d(x.reshape(-1, x.shape[-1]))  # (T, K)
    return q.view(*lead, -1), a16.view(*lead, 1), sa.view(*lead, 1)


# ----------------------------------------------------------------------------- linear epilogue
@dataclass(frozen=True)
class EpilogueParams:
    """Per-column (m, bias) and per-part (end column, shift, clamp) of one or several fused IntLinear epilogues."""

    m: torch.Tensor  # (N,) int64
    bias: torch.Tensor | None  # (N,) int64
    seg_end: torch.Tensor  # (P,) int64, cumulative part sizes
    seg_shift: torch.Tensor  # (P,)
    seg_lo: torch.Tensor  # (P,) -limit + 1
    seg_hi: torch.Tensor  # (P,) limit - 1

    @staticmethod
    def build(parts: list[tuple[torch.Tensor, torch.Tensor | None, int, int]]) -> EpilogueParams:
        """From (m (N_j,), bias (N_j,) or None, shift, limit) per part; limits must be in [1, 2^31]."""
        if not parts:
            raise ValueError("EpilogueParams: no parts")
        for _, _, shift, limit in parts:
            if not (1 <= limit <= 1 << 31) or abs(shift) >= 1 << 62:
                raise ValueError(f"EpilogueParams: limit {limit} outside [1, 2^31] (int32 outputs) or shift {shift}")
        m = torch.cat([_i64(p[0]).reshape(-1) for p in parts])
        has_bias = any(p[1] is not None for p in parts)
        bias = None
        if has_bias:
            bias = torch.cat([_i64(p[1] if p[1] is not None else torch.zeros(len(p[0]))).reshape(-1) for p in parts])
        sizes = torch.tensor([len(p[0]) for p in parts], dtype=torch.int64)
        return EpilogueParams(
            m,
            bias,
            torch.cumsum(sizes, 0),
            _i64([p[2] for p in parts]),
            _i64([-p[3] + 1 for p in parts]),
            _i64([p[3] - 1 for p in parts]),
        )

    @property
    def n(self) -> int:
        return self.m.numel()

    @functools.cached_property
    def struct(self) -> EpiStruct:
        """The C struct of these parameters (made once; the tensors it points to live as long as self)."""
        ptrs = [None if t is None else t.data_ptr() for t in (self.m, self.bias, self.seg_end, self.seg_shift)]
        ptrs += [self.seg_lo.data_ptr(), self.seg_hi.data_ptr()]
        return EpiStruct(*ptrs, self.seg_end.numel())


def linear_epilogue(
    acc: torch.Tensor, a16: torch.Tensor, sa: torch.Tensor, params: EpilogueParams, float_scale: float | None = None
) -> torch.Tensor:
    """IntLinear.epilogue (per part) of int32 acc (T, N) and row scales a16, sa (T, 1), then .to(int32).

    With float_scale (a power of two, outputs |y| < 2^24) the result is float32 y * float_scale instead,
    exactly IntLMHead's `forward_int(x).float() * 2^-frac`.
    """
    acc, lda = _rows(acc, (torch.int32,), "linear_epilogue")
    t, n = acc.shape
    if n != params.n:
        raise ValueError(f"linear_epilogue: {n} columns, params for {params.n}")
    a, s = _i64(a16).reshape(-1), _i64(sa).reshape(-1)
    if a.numel() != t or s.numel() != t:
        raise ValueError("linear_epilogue: a16 / sa need one value per row")
    out = torch.empty(t, n, dtype=torch.int32 if float_scale is None else torch.float32)
    if t == 0:
        return out
    ptr_i, ptr_f, scale = (out.data_ptr(), None, 0.0) if float_scale is None else (None, out.data_ptr(), float_scale)
    if float_scale is not None and (math.frexp(float_scale)[0] != 0.5 or int(params.seg_hi.max()) >= 1 << 24):
        raise ValueError("linear_epilogue: float output needs a power-of-two scale and |y| < 2^24")
    p = params
    _lib().ditto_epilogue(
        acc.data_ptr(), t, n, lda, a.data_ptr(), s.data_ptr(), p.m.data_ptr(),
        None if p.bias is None else p.bias.data_ptr(), p.seg_end.numel(), p.seg_end.data_ptr(),
        p.seg_shift.data_ptr(), p.seg_lo.data_ptr(), p.seg_hi.data_ptr(), ptr_i, ptr_f, scale,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- MLP
def sigmoid(x: torch.Tensor, frac: int) -> torch.Tensor:
    """`integer_ops.sigmoid_int` (Q30) of int64 x in Q.frac, 0 <= frac <= 24: the activations' core (for tests)."""
    if not 0 <= frac <= 24:
        raise ValueError(f"sigmoid: frac {frac} outside [0, 24]")
    x = _i64(x)
    _check_cpu(x)
    out = torch.empty_like(x)
    _lib().ditto_sigmoid(x.data_ptr(), x.numel(), frac, iops._tables("cpu")["exp2"].data_ptr(), out.data_ptr())
    return out


@dataclass(frozen=True)
class MLPParams:
    """IntMLP's fused gate|up epilogue, activation and product shift (see `mlp_act_quantize`)."""

    epi: EpilogueParams  # two parts: gate, up (equal sizes)
    gelu: bool
    frac: int  # Q.fg of the gate
    pshift: int  # fg + fu - fh
    hlim: int  # |h| <= hlim after the product shift
    gconst: torch.Tensor  # (4,) dyadic(0.044715, 20) + dyadic(2 sqrt(2/pi), 24)

    @staticmethod
    def build(epi: EpilogueParams, gelu: bool, frac: int, pshift: int, hlim: int) -> MLPParams:
        if epi.seg_end.numel() != 2 or 2 * int(epi.seg_end[0]) != epi.n:
            raise ValueError("MLPParams: the epilogue needs two equal parts (gate, up)")
        if not 0 <= frac <= 24 or abs(pshift) > 62 or not 0 <= hlim < 1 << 62:  # python-int shifts in torch: <= 62
            raise ValueError(f"MLPParams: frac {frac} outside [0, 24] or pshift / hlim out of range")
        cm, ce = iops.dyadic(iops._GELU_C, 20)
        km, ke = iops.dyadic(iops._GELU_K, 24)
        if not (0 <= ce <= 62 and 0 <= ke <= 62):
            raise ValueError("MLPParams: gelu dyadic shifts outside [0, 62]")
        return MLPParams(epi, gelu, frac, pshift, hlim, _i64([cm, ce, km, ke]))


def mlp_act_quantize(
    acc: torch.Tensor, a16: torch.Tensor, sa: torch.Tensor, params: MLPParams, quantize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
    """IntMLP from the fused gate|up GEMM to down_proj's input quantisation, bit-exact with the torch chain.

    acc (T, 2I) int32 with row scales a16, sa (T, 1): gate, up = the two epilogues; h = act(gate) * up,
    rshift_round by pshift (or << -pshift), clamped to +-hlim; returns quantize_rows(h): q (T, I) int8,
    a16, sa (T, 1) int64, or with quantize=False h itself (T, I) int64 (for tests).
    """
    acc, lda = _rows(acc, (torch.int32,), "mlp_act_quantize")
    t, n2 = acc.shape
    p, e = params, params.epi
    if n2 != e.n:
        raise ValueError(f"mlp_act_quantize: {n2} columns, params for {e.n}")
    a, s = _i64(a16).reshape(-1), _i64(sa).reshape(-1)
    if a.numel() != t or s.numel() != t:
        raise ValueError("mlp_act_quantize: a16 / sa need one value per row")
    i = n2 // 2
    q = torch.empty(t, i, dtype=torch.int8)
    oa, osa = torch.empty(t, 1, dtype=torch.int64), torch.empty(t, 1, dtype=torch.int64)
    tab = iops._tables("cpu")["exp2"]
    raw = None if quantize else torch.empty(t, i, dtype=torch.int64)
    rc = _lib().ditto_mlp(
        acc.data_ptr(), t, i, lda, a.data_ptr(), s.data_ptr(), e.m.data_ptr(),
        None if e.bias is None else e.bias.data_ptr(), e.seg_shift.data_ptr(), e.seg_lo.data_ptr(),
        e.seg_hi.data_ptr(), int(p.gelu), p.frac, p.gconst.data_ptr(), p.pshift, p.hlim, tab.data_ptr(),
        q.data_ptr(), oa.data_ptr(), osa.data_ptr(), None if raw is None else raw.data_ptr(),
    )  # fmt: skip
    _oom(rc, "mlp")
    return (q, oa, osa) if raw is None else raw


# ----------------------------------------------------------------------------- RMSNorm
@dataclass(frozen=True)
class NormParams:
    """IntRMSNorm's integers: gamma_m (D,), gamma_e, eps_int and the output shift."""

    gm: torch.Tensor  # (D,) int64
    ge: int
    eps_term: int  # min(eps_int * D, 2^60), as in rmsnorm_int
    b: int  # pre-shift target bits, as in rmsnorm_int
    oshift: int  # IntRMSNorm.shift

    @staticmethod
    def build(gm: torch.Tensor, ge: int, eps_int: int, oshift: int) -> NormParams:
        d = gm.numel()
        if d == 0 or not 0 <= ge <= 62 or abs(oshift) > 62 or eps_int < 0:
            raise ValueError(f"NormParams: D={d}, gamma_e={ge}, shift={oshift}, eps={eps_int} out of range")
        b = (61 - math.ceil(math.log2(d))) // 2  # the same expression as rmsnorm_int
        return NormParams(_i64(gm).reshape(-1), ge, min(eps_int * d, 1 << 60), b, oshift)

    @functools.cached_property
    def struct(self) -> NormStruct:
        """The C struct of these parameters (made once; gamma_m lives as long as self)."""
        return NormStruct(self.gm.data_ptr(), self.ge, self.eps_term, self.b, self.oshift)


def rmsnorm(x: torch.Tensor, params: NormParams) -> torch.Tensor:
    """IntRMSNorm.forward of int32 x (..., D): rmsnorm_int, the output shift, .to(int32); bit-exact."""
    d = params.gm.numel()
    if x.shape[-1] != d:
        raise ValueError(f"rmsnorm: last dim {x.shape[-1]}, gain for {d}")
    x2, ld = _rows(x.reshape(-1, d), (torch.int32,), "rmsnorm")  # (T, D)
    y = torch.empty(x2.shape, dtype=torch.int32)
    p = params
    if x2.shape[0]:
        _lib().ditto_rmsnorm(x2.data_ptr(), x2.shape[0], d, ld, p.gm.data_ptr(), p.ge, p.eps_term, p.b, p.oshift,
                             y.data_ptr())  # fmt: skip
    return y.view(x.shape)


# ----------------------------------------------------------------------------- attention heads
def head_post(
    x: torch.Tensor,
    norm: NormParams | None,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    frac: int = 14,
    quantize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
    """quantize_rows(rope_int(IntRMSNorm(x) or x, positions, cos, sin, frac)) for int32 x (T, Hx, D).

    x may be a column slice of a wider matrix (unit stride within a token's heads); cos / sin (P, D/2)
    int32 tables (as `integer_ops.rope_tables` makes them). Returns q (T, Hx, D) int8, a16, sa (T, Hx, 1)
    int64, bit-exact with the torch chain, or with quantize=False the RoPE output (T, Hx, D) int64 (for tests).
    """
    if x.dtype != torch.int32 or x.dim() != 3:
        raise ValueError(f"head_post: (T, Hx, D) int32 expected, got {x.dtype} {tuple(x.shape)}")
    t, hx, d = x.shape
    if d % 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != d // 2:
        raise ValueError(f"head_post: even head dim and (P, D/2) tables expected, got {d}, {tuple(cos.shape)}")
    if cos.dtype != torch.int32 or sin.dtype != torch.int32 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("head_post: contiguous int32 cos / sin tables expected")
    if norm is not None and norm.gm.numel() != d:
        raise ValueError("head_post: norm gain size differs from the head dim")
    if not 0 <= frac <= 62:
        raise ValueError(f"head_post: rope frac {frac} out of range")
    _check_cpu(x, positions, cos, sin)
    if x.stride(2) != 1 or x.stride(1) != d or (t > 1 and x.stride(0) < hx * d):
        x = x.contiguous()
    pos = _i64(positions).reshape(-1)
    if pos.numel() != t:
        raise ValueError("head_post: one position per token expected")
    q = torch.empty(t, hx, d, dtype=torch.int8)
    a16, sa = torch.empty(t, hx, 1, dtype=torch.int64), torch.empty(t, hx, 1, dtype=torch.int64)
    raw = None if quantize else torch.empty(t, hx, d, dtype=torch.int64)
    if t == 0 or hx == 0:
        return (q, a16, sa) if raw is None else raw
    if int(pos.min()) < 0 or int(pos.max()) >= cos.shape[0]:
        raise ValueError(f"head_post: position outside the RoPE table ({cos.shape[0]})")
    ld = x.stride(0) if t > 1 else hx * d
    n = norm
    rc = _lib().ditto_head_post(
        x.data_ptr(), t, hx, d, ld, None if n is None else n.gm.data_ptr(), 0 if n is None else n.ge,
        0 if n is None else n.eps_term, 0 if n is None else n.b, 0 if n is None else n.oshift,
        pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), frac, q.data_ptr(), a16.data_ptr(), sa.data_ptr(),
        None if raw is None else raw.data_ptr(),
    )  # fmt: skip
    _oom(rc, "head_post")
    return (q, a16, sa) if raw is None else raw


def requant_quantize(
    o: torch.Tensor, m: torch.Tensor, e: torch.Tensor, limit: int, quantize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
    """quantize_rows(requantise(o, m, e).clamp(-limit + 1, limit - 1)) for int64 o (T, N), m / e (N,) int64.

    With quantize=False the clamped requantised values (T, N) int64 instead (for tests).
    """
    o, _ = _rows(o, (torch.int64,), "requant_quantize")
    o = o.contiguous()
    t, n = o.shape
    if m.shape != (n,) or e.shape != (n,) or m.dtype != torch.int64 or e.dtype != torch.int64:
        raise ValueError("requant_quantize: m, e (N,) int64 expected")
    if not (m.is_contiguous() and e.is_contiguous()) or n == 0 or not 1 <= limit <= 1 << 62:
        raise ValueError("requant_quantize: contiguous m, e and N > 0 expected")
    q = torch.empty(t, n, dtype=torch.int8)
    a16, sa = torch.empty(t, 1, dtype=torch.int64), torch.empty(t, 1, dtype=torch.int64)
    raw = None if quantize else torch.empty(t, n, dtype=torch.int64)
    if t:
        rc = _lib().ditto_requant_quant(o.data_ptr(), t, n, m.data_ptr(), e.data_ptr(), -limit + 1, limit - 1,
                                        q.data_ptr(), a16.data_ptr(), sa.data_ptr(),
                                        None if raw is None else raw.data_ptr())  # fmt: skip
        _oom(rc, "requant_quantize")
    return (q, a16, sa) if raw is None else raw


# ----------------------------------------------------------------------------- fused layer steps
def _epi_rows(acc: torch.Tensor, a16: torch.Tensor, sa: torch.Tensor, params: EpilogueParams, what: str):
    acc, lda = _rows(acc, (torch.int32,), what)
    if acc.shape[1] != params.n:
        raise ValueError(f"{what}: {acc.shape[1]} columns, epilogue for {params.n}")
    a, s = _i64(a16).reshape(-1), _i64(sa).reshape(-1)
    if a.numel() != acc.shape[0] or s.numel() != acc.shape[0]:
        raise ValueError(f"{what}: a16 / sa need one value per row")
    return acc, lda, a, s


def res_norm_quant(
    x: torch.Tensor,
    norm: NormParams,
    epi: tuple[torch.Tensor, torch.Tensor, torch.Tensor, EpilogueParams] | None = None,
    post: NormParams | None = None,
    quantize: bool = True,
) -> tuple[torch.Tensor, ...]:
    """The residual add and the next norm of a decoder layer, in place on the residual x (T, D) int32:

    with epi = (acc (T, D) int32, a16, sa (T, 1), params): h = linear_epilogue(acc, a16, sa, params),
    h = rmsnorm(h, post) when post is given, x += h (int32); then z = rmsnorm(x, norm). Returns
    (z,) + quantize_rows(z) (q (T, D) int8, a16, sa (T, 1) int64), or (z,) with quantize=False.
    """
    d = norm.gm.numel()
    if x.dtype != torch.int32 or x.dim() != 2 or x.shape[1] != d or not x.is_contiguous():
        raise ValueError(f"res_norm_quant: contiguous (T, {d}) int32 residual expected, got {x.dtype} {tuple(x.shape)}")
    _check_cpu(x)
    if post is not None and post.gm.numel() != d:
        raise ValueError("res_norm_quant: post norm size differs from the residual")
    t = x.shape[0]
    acc_p, lda, a_p, s_p, ep = None, 0, None, None, None
    if epi is not None:
        acc, lda, a, s = _epi_rows(*epi, "res_norm_quant")
        if acc.shape != (t, d):
            raise ValueError("res_norm_quant: acc must be (T, D)")
        acc_p, a_p, s_p, ep = acc.data_ptr(), a.data_ptr(), s.data_ptr(), ctypes.addressof(epi[3].struct)
    z = torch.empty(t, d, dtype=torch.int32)
    q = torch.empty(t, d, dtype=torch.int8)
    qa, qs = torch.empty(t, 1, dtype=torch.int64), torch.empty(t, 1, dtype=torch.int64)
    if t:
        post_p = None if post is None else ctypes.addressof(post.struct)
        rc = _lib().ditto_res_norm_quant(
            t, d, acc_p, lda, a_p, s_p, ep, post_p, x.data_ptr(), ctypes.addressof(norm.struct), z.data_ptr(),
            q.data_ptr() if quantize else None, qa.data_ptr(), qs.data_ptr(),
        )  # fmt: skip
        _oom(rc, "res_norm_quant")
    return (z, q, qa, qs) if quantize else (z,)


def qkv_post(
    acc: torch.Tensor,
    a16: torch.Tensor,
    sa: torch.Tensor,
    epi: EpilogueParams,
    heads: tuple[int, int, int],
    norms: tuple[NormParams, NormParams] | None,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    frac: int = 14,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IntAttention's steps from the fused q|k|v GEMM acc (T, (H + 2 Hkv) D) int32 to the attention inputs:
    the epilogues, head_post of the query heads (returned: q8 (T, H, D) int8, qa16, qsa (T, H, 1) int64) and
    of the key heads, stored with the values (.to(int8)) at cache rows slots (T,) of cache = (k8 (.., Hkv, D)
    int8, ka16 (.., Hkv, 1) int32, ksa (.., Hkv, 1) int8, v8 (.., Hkv, D) int8), viewed as (S, Hkv, .).
    heads = (H, Hkv, D); norms = (q_norm, k_norm) params or None."""
    h, kv, d = heads
    acc, lda, a, s = _epi_rows(acc, a16, sa, epi, "qkv_post")
    t = acc.shape[0]
    if acc.shape[1] != (h + 2 * kv) * d or d % 2:
        raise ValueError(f"qkv_post: {acc.shape[1]} columns for heads {heads}")
    if cos.dtype != torch.int32 or sin.dtype != torch.int32 or cos.shape != sin.shape or cos.shape[1:] != (d // 2,):
        raise ValueError("qkv_post: (P, D/2) int32 cos / sin tables expected")
    if not (cos.is_contiguous() and sin.is_contiguous()) or not 0 <= frac <= 62:
        raise ValueError("qkv_post: contiguous tables and 0 <= frac <= 62 expected")
    if norms is not None and any(n.gm.numel() != d for n in norms):
        raise ValueError("qkv_post: norm gain size differs from the head dim")
    k8, ka, ks, v8 = cache
    rows = k8.numel() // (kv * d) if kv * d else 0
    dts = (torch.int8, torch.int32, torch.int8, torch.int8)
    sizes = (rows * kv * d, rows * kv, rows * kv, rows * kv * d)
    if any(c.dtype != dt or c.numel() != n or not c.is_contiguous() for c, dt, n in zip(cache, dts, sizes)):
        raise ValueError("qkv_post: contiguous int8 / int32 / int8 / int8 caches of (S, Hkv, D | 1) expected")
    pos, sl = _i64(positions).reshape(-1), _i64(slots).reshape(-1)
    _check_cpu(pos, sl, cos, sin, *cache)
    if pos.numel() != t or sl.numel() != t:
        raise ValueError("qkv_post: one position and one slot per token expected")
    q8 = torch.empty(t, h, d, dtype=torch.int8)
    qa, qs = torch.empty(t, h, 1, dtype=torch.int64), torch.empty(t, h, 1, dtype=torch.int64)
    if t == 0:
        return q8, qa, qs
    if int(pos.min()) < 0 or int(pos.max()) >= cos.shape[0]:
        raise ValueError(f"qkv_post: position outside the RoPE table ({cos.shape[0]})")
    if int(sl.min()) < 0 or int(sl.max()) >= rows:
        raise ValueError("qkv_post: slot outside the cache")
    qn, kn = (None, None) if norms is None else (ctypes.addressof(norms[0].struct), ctypes.addressof(norms[1].struct))
    rc = _lib().ditto_qkv_post(
        t, acc.data_ptr(), lda, a.data_ptr(), s.data_ptr(), ctypes.addressof(epi.struct), h, kv, d, qn, kn,
        pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), frac, q8.data_ptr(), qa.data_ptr(), qs.data_ptr(),
        sl.data_ptr(), *(c.data_ptr() for c in cache),
    )  # fmt: skip
    _oom(rc, "qkv_post")
    return q8, qa, qs


# ----------------------------------------------------------------------------- int8 GEMV
def row_sums(w: torch.Tensor) -> torch.Tensor:
    """The (N,) int32 row sums of an int8 weight (N, K) that `gemv` takes (made once per weight)."""
    return w.sum(dim=1, dtype=torch.int32).contiguous()


def gemv(x: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor) -> torch.Tensor:
    """Exact int32 x @ w.T for one int8 row x (1, K) and an int8 weight w (N, K) (what `integer_ops.int8_matmul`
    gives for M = 1), wsum = row_sums(w); returns (1, N) int32."""
    if x.dtype != torch.int8 or w.dtype != torch.int8 or x.dim() != 2 or x.shape[0] != 1 or w.dim() != 2:
        raise ValueError(f"gemv: int8 (1, K) and (N, K) expected, got {x.dtype} {tuple(x.shape)}, {tuple(w.shape)}")
    n, k = w.shape
    if x.shape[1] != k or wsum.shape != (n,) or wsum.dtype != torch.int32 or k >= 1 << 17:
        raise ValueError("gemv: K mismatch, (N,) int32 row sums or K >= 2^17")
    _check_cpu(x, w, wsum)
    x, w, wsum = x.contiguous(), w.contiguous(), wsum.contiguous()
    y = torch.empty(1, n, dtype=torch.int32)
    if n and k:
        _lib().ditto_gemv_s8(x.data_ptr(), w.data_ptr(), wsum.data_ptr(), n, k, y.data_ptr())
    elif n:
        y.zero_()
    return y


def quant_weight(
    w: torch.Tensor, col_scale: torch.Tensor | None = None, row_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`integer.quant_weight`'s float32 arithmetic in one pass per row: (w8 int8 (N, K), s float32 (N,)),
    bit for bit its torch ops; None when the kernel is unavailable or a value is not finite (the
    caller then runs the torch ops). Setup time, not the forward: 0.4 s of torch ops on SmolLM2."""
    lib = _LIBRARY.load()
    if lib is None or w.dim() != 2 or w.device.type != "cpu":
        return None
    w = w.detach().float().contiguous()
    n, k = w.shape
    c = None if col_scale is None else col_scale.float().contiguous()
    r = None if row_scale is None else row_scale.float().contiguous()
    q = torch.empty(n, k, dtype=torch.int8)
    s = torch.empty(n, dtype=torch.float32)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    lib.ditto_quant_weight(w.data_ptr(), n, k, ptr(c), ptr(r), q.data_ptr(), s.data_ptr())
    return (q, s) if bool(torch.isfinite(s).all()) else None


def col_absmax(w: torch.Tensor) -> torch.Tensor | None:
    """max over rows of |w| per column, float32 (K,) (exact); None without the kernel."""
    lib = _LIBRARY.load()
    if lib is None or w.dim() != 2 or w.device.type != "cpu":
        return None
    w = w.detach().float().contiguous()
    out = torch.empty(w.shape[1], dtype=torch.float32)
    lib.ditto_col_absmax(w.data_ptr(), w.shape[0], w.shape[1], out.data_ptr())
    return out
