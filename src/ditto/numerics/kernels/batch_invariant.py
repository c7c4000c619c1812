"""Batch-invariant kernels for the `batch_invariant` determinism level (CPU; fp32, bf16, layercast).

Contract: for a fixed model, numerics mode, device type and thread count, the result for one row
(one token) is bit-identical whatever the batch size M, the row's position in the batch and the
other rows.  Measured on this project's CPU (benchmarks/batch_invariance_probe.py):

* fp32 torch GEMM (MKL) is NOT invariant: M=1 takes a gemv path, M=2..3 another kernel, M>=4 a
  third, and for 4 <= M < 12 the rows past the last multiple of 4 take an edge kernel.  MKL's
  order is not a plain FMA chain, so no cheap torch-side trick reproduces it for small M.
* bf16 torch GEMM (oneDNN) is invariant for every M >= 2 on the engine's shapes on the AMD dev
  box, but M=1 takes a different path for K=1536 (e.g. the MLP down projection); on an Intel Xeon
  rows also change at larger M (K=1536, M=255).
* Row reductions (sum/mean/amax/argmax/softmax/log_softmax/logsumexp/rms_norm) over the last
  dim of a contiguous (M, V) tensor, and torch.bmm with a fixed per-matrix shape, are already
  invariant; tests/test_batch_invariant_kernels.py proves it bit for bit on every run.

Design of `invariant_linear`:

* fp32 (and layercast = bf16 weights, fp32 compute): a small C kernel (ditto/csrc/batch_invariant.c,
  compiled once with the system C compiler, loaded with ctypes, OpenMP shared with torch's libgomp)
  that computes every output element as ONE sequential fp32 FMA chain over k = 0..K-1 starting from
  0, then adds the bias.  Tiling (6 rows x 64 columns register tiles, M blocks, N panels) and threading only decide
  *which* elements a core computes, never the order of an element's reduction, so the result is
  invariant to M, position, other rows AND thread count, and - the chain being plain IEEE FMA -
  identical on any FMA-capable CPU.  Weights are pre-packed once into 64-column panels (bf16
  weights stay bf16 and are widened in registers, which halves decode memory traffic).
* bf16 (x and W both bf16): the fixed-order bf16 kernel of bf16_linear.py (ditto/csrc/bf16_linear.c):
  per pair of k, what one lane of AVX512_BF16's vdpbf16ps does (two exact-product fp32 FMA steps with
  FTZ/DAZ), the instruction itself where the CPU has it and bit-exact emulations elsewhere; the
  weights stay bf16, packed in pairs.  Without that library, the fp32 kernel above (bf16 x and W
  widened exactly, one fp32 FMA chain, rounded to bf16 once).  torch/oneDNN bf16 with M padded to
  >= 2 rows was invariant on the AMD EPYC dev box but NOT on an Intel Xeon (K=1536, M=255), so it
  is opt-in only (DITTO_BI_BF16_ONEDNN=1, guarded by a one-off per-shape self-check).
* Without a C compiler, fp32 falls back to torch GEMMs on fixed 32-row zero-padded tiles (MKL's
  M>=12 kernel is row-position invariant on this CPU); slower, and also guarded by a self-check.

CPU only: on GPUs the `batch_invariant` level uses tiled.py's fixed-shape GEMMs instead.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditto.numerics.kernels import bf16_linear
from ditto.numerics.kernels.cbuild import CLibrary

__all__ = [
    "InvariantLinear",
    "PackedWeight",
    "invariant_argmax",
    "invariant_bmm",
    "invariant_linear",
    "invariant_log_softmax",
    "invariant_logsumexp",
    "invariant_mean",
    "invariant_rms_norm",
    "invariant_softmax",
    "invariant_sum",
    "kernel_available",
    "kernel_status",
    "pack_weight",
]

# ----------------------------------------------------------------------------------------------
# C kernel
# ----------------------------------------------------------------------------------------------

_NR = 64  # columns per packed panel (4 x 16-lane vectors; NR in csrc/batch_invariant.c)
_MC = 96  # rows per M block (cache blocking only; never changes an element's reduction order)


def _setup(lib: ctypes.CDLL) -> str | None:
    argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
    argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    for fn in (lib.ditto_bi_linear_f32w, lib.ditto_bi_linear_bf16w):
        fn.argtypes = argtypes
        fn.restype = None
    lib.ditto_selftest.restype = ctypes.c_int
    if lib.ditto_selftest() != 1:  # FMA not contracted: still invariant, but not the documented chain
        return "kernel self-test failed (no FMA contraction)"
    return None


_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-fast-math", "-fopenmp", "-shared", "-fPIC")
_LIBRARY = CLibrary("batch_invariant.c", "DITTO_BI_DISABLE_KERNEL", _setup, _FLAGS)
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


def _load_lib() -> ctypes.CDLL | None:
    """Build (once, cached on disk) and load the C kernel; None when no compiler / OpenMP is usable."""
    global _lib, _lib_error
    _lib = _LIBRARY.load()
    _lib_error = _LIBRARY.error
    return _lib


def kernel_available() -> bool:
    """True when the compiled CPU kernel is usable (builds it on first call)."""
    return _load_lib() is not None


def kernel_status() -> str:
    """'ok' or the reason the kernel is unavailable (for manifests / logs)."""
    return "ok" if _load_lib() is not None else str(_lib_error)


# ----------------------------------------------------------------------------------------------
# Packed weights
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedWeight:
    """A (N, K) weight repacked into ceil(N/64) panels of (K, 64), fp32 or bf16 (zero padded)."""

    data: Tensor  # (num_panels, K, 64)
    n: int
    k: int

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype


def pack_weight(weight: Tensor) -> PackedWeight:
    """Repack an nn.Linear weight (N, K) for the CPU kernel; bf16 stays bf16, other dtypes -> fp32."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got {tuple(weight.shape)}")
    n, k = weight.shape
    dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
    num_panels, full = (n + _NR - 1) // _NR, n // _NR
    w = weight.detach().to(device="cpu", dtype=dtype)
    data = torch.empty(num_panels, k, _NR, dtype=dtype)  # one strided copy, no zero fill of what is written
    data[:full].copy_(w[: full * _NR].view(full, _NR, k).transpose(1, 2))  # (full, 64, K) -> (full, K, 64)
    if full < num_panels:  # the last panel: its rows, then zeros
        data[full].zero_()
        data[full, :, : n - full * _NR].copy_(w[full * _NR :].t())
    return PackedWeight(data, n, k)


_pack_cache: dict[tuple[int, bool], tuple[weakref.ref, int, int, PackedWeight | bf16_linear.PackedBf16]] = {}


def _packed_for(weight: Tensor, pairs: bool = False) -> PackedWeight | bf16_linear.PackedBf16:
    """Packed copy of `weight` (pairs: for the bf16 kernel), cached per tensor object and
    invalidated when it is modified."""
    key = (id(weight), pairs)
    hit = _pack_cache.get(key)
    if hit is not None and hit[0]() is weight and hit[1:3] == (weight.data_ptr(), weight._version):
        return hit[3]
    packed = bf16_linear.pack_weight(weight) if pairs else pack_weight(weight)
    _pack_cache[key] = (
        weakref.ref(weight, lambda _r, key=key: _pack_cache.pop(key, None)),
        weight.data_ptr(),
        weight._version,
        packed,
    )
    return packed


def uses_bf16_kernel(x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """bf16 x and bf16 weights run on bf16_linear's kernel (unless oneDNN was asked for)."""
    both = x_dtype == torch.bfloat16 and w_dtype == torch.bfloat16
    return both and not _BF16_ONEDNN and bf16_linear.kernel_available()


def _kernel_linear(x: Tensor, packed: PackedWeight, bias: Tensor | None) -> Tensor:
    """fp32 x (T, K) @ packed^T -> fp32 (T, N) via the C kernel (caller checked availability)."""
    lib = _lib
    assert lib is not None
    x = x.to(torch.float32)
    if x.stride(-1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    t = x.shape[0]
    y = torch.empty(t, packed.n, dtype=torch.float32)
    if t == 0:
        return y
    b = None
    if bias is not None:
        b = torch.zeros(packed.data.shape[0] * _NR, dtype=torch.float32)
        b[: packed.n] = bias.detach().to(torch.float32)
    fn = lib.ditto_bi_linear_bf16w if packed.dtype == torch.bfloat16 else lib.ditto_bi_linear_f32w
    fn(
        x.data_ptr(),
        t,
        packed.k,
        x.stride(0),
        packed.data.data_ptr(),
        packed.n,
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        _MC,
    )
    return y


# ----------------------------------------------------------------------------------------------
# torch-GEMM paths (bf16 via oneDNN; fp32 fallback without a compiler) and their self-check
# ----------------------------------------------------------------------------------------------

_TILE = 32  # fixed row tile for the no-compiler fp32 fallback


def _onednn_bf16_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if x.shape[0] == 1:  # M=1 may take a gemv-like path with another reduction order (K=1536)
        return F.linear(torch.cat([x, x.new_zeros(1, x.shape[1])]), weight, bias)[:1]
    return F.linear(x, weight, bias)


def _tiled_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear on fixed (_TILE, K) zero-padded tiles: every call has the same shape."""
    t = x.shape[0]
    pad = (-t) % _TILE
    xp = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x
    out = torch.cat([F.linear(tile, weight, bias) for tile in xp.split(_TILE)]) if t else xp[:, :0]
    return out[:t]


# oneDNN bf16 (M padded to >= 2) is invariant on the AMD EPYC dev box but NOT on an Intel Xeon
# (K=1536 rows change at M=255), so it is opt-in (DITTO_BI_BF16_ONEDNN=1) and self-checked.
_BF16_ONEDNN = os.environ.get("DITTO_BI_BF16_ONEDNN", "") == "1"
_SELF_CHECK_MS = (1, 2, 3, 5, 7, 13, 33, 70, 255, 300)
_checked: dict[tuple, bool] = {}


def _self_check(
    kind: str, fn: Callable[[Tensor, Tensor, Tensor | None], Tensor], weight: Tensor, has_bias: bool
) -> bool:
    """One-off per (path, shape, dtype, threads) check that `fn` is row-invariant (rows alone vs in batches)."""
    key = (kind, tuple(weight.shape), weight.dtype, has_bias, torch.get_num_threads())
    ok = _checked.get(key)
    if ok is None:
        g = torch.Generator().manual_seed(1234)
        n, k = weight.shape
        xs = torch.randn(max(_SELF_CHECK_MS), k, generator=g).to(weight.dtype)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(weight.dtype)
        b = torch.randn(n, generator=g).to(weight.dtype) if has_bias else None
        alone = torch.cat([fn(xs[i : i + 1], w, b) for i in range(xs.shape[0])])
        ok = all(torch.equal(fn(xs[:m], w, b), alone[:m]) for m in _SELF_CHECK_MS)
        ok = ok and torch.equal(fn(xs[3:9], w, b), alone[3:9])
        _checked[key] = ok
    return ok


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _cpu_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedWeight | bf16_linear.PackedBf16 | None
) -> Tensor:
    out_dtype = x.dtype
    if uses_bf16_kernel(out_dtype, weight.dtype):
        pb = packed if isinstance(packed, bf16_linear.PackedBf16) else _packed_for(weight, pairs=True)
        return bf16_linear.linear(x, pb, bias)
    both_bf16 = out_dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
    if both_bf16 and _BF16_ONEDNN and _self_check("onednn_bf16", _onednn_bf16_linear, weight, bias is not None):
        return _onednn_bf16_linear(x, weight, bias)
    # else (fp32, layercast, or bf16 whose self-check failed): exact products in an fp32 FMA chain
    if _load_lib() is not None:
        pw = packed if isinstance(packed, PackedWeight) else _packed_for(weight)
        return _kernel_linear(x, pw, bias).to(out_dtype)
    # no compiler: fixed-tile torch GEMMs in the compute dtype (fp32 unless both are bf16)
    cdt = torch.bfloat16 if (out_dtype == torch.bfloat16 and weight.dtype == torch.bfloat16) else torch.float32
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    if not _self_check("tiled", _tiled_linear, w, b is not None):
        raise RuntimeError(
            f"no batch-invariant linear available on this CPU for {tuple(weight.shape)} {cdt}: "
            f"{_lib_error}; install a C compiler (gcc) with OpenMP"
        )
    return _tiled_linear(x.to(cdt), w, b).to(out_dtype)


def invariant_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    packed: PackedWeight | bf16_linear.PackedBf16 | None = None,
) -> Tensor:
    """Batch-invariant `F.linear` for 2-D x (T, K) and weight (N, K); returns (T, N) in x's dtype.

    Row t of the result depends only on x[t] (bitwise), never on T or the other rows.
    dtypes: fp32 x & fp32 weight; fp32 x & bf16 weight (layercast: exact widening, fp32 compute);
    bf16 x & bf16 weight (fp32 accumulation, bf16 output).  Inference only (no autograd).
    `packed` (from `pack_weight(weight)`, or `bf16_linear.pack_weight` for bf16 x bf16) skips the
    per-weight packing cache lookup.
    """
    if x.dim() != 2:
        raise ValueError(f"invariant_linear expects 2-D x (T, K), got {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs weight {tuple(weight.shape)}")
    if x.device.type != "cpu":
        raise NotImplementedError(f"no batch-invariant linear for device {x.device.type!r} (GPUs: kernels/tiled.py)")
    return _cpu_linear(x, weight, bias, packed)  # inference only: the kernel path records no autograd graph


class InvariantLinear(nn.Module):
    """Drop-in for an inference-only nn.Linear whose rows are batch-invariant.

    `compute_dtype=torch.float32` with bf16 weights is layercast: weights stay bf16 in memory and
    are widened exactly inside the kernel; inputs are cast to fp32 and the output is fp32.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.compute_dtype = compute_dtype if compute_dtype is not None else weight.dtype
        self._packed: PackedWeight | bf16_linear.PackedBf16 | None = None
        self._packed_stamp: tuple[int, int] | None = None
        self._released = False  # True once only the packed copy is kept (release_unpacked)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype: torch.dtype | None = None) -> InvariantLinear:
        return cls(linear.weight, linear.bias, compute_dtype=compute_dtype)

    def release_unpacked(self) -> bool:
        """Pack now and keep only the packed copy, which is all the C kernel reads: the weight
        (N, K) becomes a meta tensor (shape and dtype kept), so a linear that owned its weight no
        longer holds it twice. A weight shared elsewhere (a tied embedding) lives on there.
        False (nothing changed) when this linear does not run on a C kernel."""
        if self.weight.device.type != "cpu":
            return False
        on_bf16 = self.compute_dtype == torch.bfloat16 and uses_bf16_kernel(torch.bfloat16, self.weight.dtype)
        if not on_bf16 and (_load_lib() is None or self.weight.dtype != torch.float32):
            return False
        if self._get_packed() is None:
            return False
        self._released = True
        meta = torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta")
        self.weight = nn.Parameter(meta, requires_grad=False)
        return True

    def _get_packed(self) -> PackedWeight | bf16_linear.PackedBf16 | None:
        if self._released:
            return self._packed
        if self.weight.device.type != "cpu":
            return None
        pairs = uses_bf16_kernel(self.compute_dtype, self.weight.dtype)
        if not pairs and self.compute_dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16:
            return None  # oneDNN (opt-in) or the fp32 kernel's fallback: packed lazily via the cache
        stamp = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed_stamp != stamp:
            self._packed = bf16_linear.pack_weight(self.weight) if pairs else pack_weight(self.weight)
            self._packed_stamp = stamp
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.compute_dtype)
        y = invariant_linear(x2, self.weight, self.bias, packed=self._get_packed())
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


# ----------------------------------------------------------------------------------------------
# Row-wise ops.  Measured (2 threads): softmax/log_softmax/amax/argmax over the last dim are
# invariant as-is; sum/mean (hence RMSNorm, logsumexp) are invariant for >= 2 rows but a single
# row with >= 32768 elements takes torch's two-pass reduction that splits the row across threads.
# The wrappers therefore never reduce a single row: M=1 is duplicated to 2 rows.
# bf16 torch.bmm is NOT invariant to the batch count (some shapes change kernel at ~84-235
# matrices); fp32 bmm is, so bf16 operands are widened exactly and the product is done in fp32.
# ----------------------------------------------------------------------------------------------


def _rows2d(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.shape[0] == 1:
        x2 = torch.cat([x2, x2])
    return x2, lead


def _unrows(y: Tensor, lead: tuple[int, ...]) -> Tensor:
    n = 1
    for d in lead:
        n *= d
    return y[:n].reshape(*lead, *y.shape[1:])


def invariant_sum(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Sum over the last dim with fp32 accumulation, per row independent of the batch."""
    _check_last(x, dim)
    x2, lead = _rows2d(x)
    y = _unrows(x2.sum(dim=-1, dtype=torch.float32), lead).to(x.dtype)
    return y.unsqueeze(-1) if keepdim else y


def invariant_mean(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    _check_last(x, dim)
    x2, lead = _rows2d(x)
    y = _unrows(x2.float().mean(dim=-1), lead).to(x.dtype)
    return y.unsqueeze(-1) if keepdim else y


def invariant_log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """log_softmax over the last dim in fp32 math, per row independent of the batch."""
    _check_last(x, dim)
    x2, lead = _rows2d(x)
    return _unrows(torch.log_softmax(x2, dim=-1, dtype=torch.float32), lead)


def invariant_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """softmax over the last dim in fp32 math (fp32 output)."""
    _check_last(x, dim)
    x2, lead = _rows2d(x)
    return _unrows(torch.softmax(x2, dim=-1, dtype=torch.float32), lead)


def invariant_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """logsumexp over the last dim in fp32: max + log(sum(exp(x - max))) with invariant pieces."""
    _check_last(x, dim)
    x2, lead = _rows2d(x)
    xf = x2.float()
    m = xf.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (xf - m).exp_().sum(dim=-1, keepdim=True)
    return _unrows((s.log_() + m).squeeze(-1), lead)


def invariant_argmax(x: Tensor, dim: int = -1) -> Tensor:
    """argmax over the last dim (exact op; ties -> first index, as torch)."""
    _check_last(x, dim)
    x2, lead = _rows2d(x)
    return _unrows(x2.argmax(dim=-1), lead)


def invariant_rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim in fp32 math: x * rsqrt(mean(x^2) + eps) * weight, cast back."""
    x2, lead = _rows2d(x)
    xf = x2.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return _unrows(y, lead).to(x.dtype)


def invariant_bmm(a: Tensor, b: Tensor) -> Tensor:
    """torch.bmm whose matrix i depends only on (a[i], b[i]) for a fixed per-matrix shape.

    fp32 math (bf16 widened exactly; result cast back to the input dtype) on contiguous operands.
    """
    out_dtype = a.dtype
    a = a.float().contiguous()
    b = b.float().contiguous()
    return torch.bmm(a, b).to(out_dtype)


def _check_last(x: Tensor, dim: int) -> None:
    if dim not in (-1, x.dim() - 1):
        raise ValueError("invariant row ops reduce over the last dim only")
