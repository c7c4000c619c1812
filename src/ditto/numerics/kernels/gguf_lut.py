"""T-MAC-style lookup-table linear on GGUF Q4_0 / Q4_1 blocks, bit-identical to `gguf_reference.linear`.

``lut_linear(x, weight, kind)`` computes ``y = x @ W^T`` under the `gguf` numerics contract
(numerics/kernels/gguf_reference.py): activations quantised to int8 per block of 32, an exact
integer sum per weight block, then one fixed fp32 chain per output element. It returns the same
bits as the reference and as the multiply-add kernels (gguf_blocks), for any M, row position,
thread count and instruction set.

The integer sums come from lookup tables instead of multiplies (T-MAC, arXiv:2407.00088): a 4-bit
weight is 4 bit planes; for each group of 4 activations the 16 possible partial sums are tabulated
once per activation row, and every weight row looks its 4-bit plane patterns up (`vpermb` on
64-entry tables of 4 groups; `vpshufb` with broadcast 16-entry tables measured slower on Zen 4).
T-MAC rounds the tables to int8; here they stay exact (each activation is split into two nibbles,
16 * qh + ql, so each group has two int8 tables whose entries meet the plane weights in `vpdpbusd`
as exact integers). The C source, with the full layout description, is ditto/csrc/gguf_lut.c.

Weights are either the file's own rows (uint8 (N, row_bytes), as `GGUFTensor.data` holds them) or
a `LutWeight` from `repack` (T-MAC's bit-plane layout: the planes are stored ready to index, so
the kernel does no bit transposition; same bytes as the file, repacked once per tensor).

Instruction sets (``isa``): ``"avx512"`` (AVX-512 F/BW/VL/DQ + VBMI + VNNI + GFNI, checked at run
time) or ``"portable"`` (plain C, any CPU); None picks the best the CPU has. Without a C compiler,
or with DITTO_GGUF_LUT_DISABLE_KERNEL=1, `kernel_available()` is False and callers use the
reference (`gguf_reference.linear`), which gives the same bits.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ditto.numerics.kernels import gguf_reference
from ditto.numerics.kernels.cbuild import DEFAULT_FLAGS, CLibrary

__all__ = [
    "KINDS",
    "LutWeight",
    "build_tables",
    "has_avx512",
    "kernel_available",
    "kernel_status",
    "lut_linear",
    "quantize_activations",
    "repack",
]

KINDS = ("Q4_0", "Q4_1")
_KIND = {"Q4_0": 0, "Q4_1": 1}
_ISA = {None: 0, "portable": 1, "avx512": 2}
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
_FILE, _PACKED = 0, 1
TILE = 16  # output rows per packed tile (TILE in csrc/gguf_lut.c)


def _setup(lib: ctypes.CDLL) -> str | None:
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.ditto_lut_has_avx512.argtypes = []
    lib.ditto_lut_has_avx512.restype = i
    lib.ditto_lut_quantize.argtypes = [i, p, n, n, n, p, p, p]
    lib.ditto_lut_quantize.restype = i
    lib.ditto_lut_repack.argtypes = [i, p, n, n, p]
    lib.ditto_lut_repack.restype = i
    lib.ditto_lut_packed_bytes.argtypes = [i, n, n]
    lib.ditto_lut_packed_bytes.restype = n
    lib.ditto_lut_tables.argtypes = [i, p, n, n, n, p, p, p]
    lib.ditto_lut_tables.restype = i
    lib.ditto_lut_linear.argtypes = [i, i, i, p, n, n, n, p, n, n, p, p, n]
    lib.ditto_lut_linear_packed.argtypes = None  # one int64 array (see LutCall)
    lib.ditto_lut_linear_packed.restype = i
    lib.ditto_lut_linear.restype = i
    return None


# the fp32 chain is a multiply then an add, never a fused multiply-add
FLAGS = (*DEFAULT_FLAGS, "-ffp-contract=off")
_LIBRARY = CLibrary("gguf_lut.c", "DITTO_GGUF_LUT_DISABLE_KERNEL", _setup, FLAGS)


def kernel_available() -> bool:
    """True when the compiled LUT kernel is usable (builds it on first call)."""
    return _LIBRARY.load() is not None


def kernel_status() -> str:
    """'ok' or the reason the kernel is unavailable (for manifests / logs)."""
    return _LIBRARY.status()


def _lib() -> ctypes.CDLL:
    lib = _LIBRARY.load()
    if lib is None:
        raise RuntimeError(f"gguf LUT kernel unavailable: {_LIBRARY.error}")
    return lib


def has_avx512() -> bool:
    """True when the AVX-512 LUT paths run on this CPU (False without the kernel)."""
    lib = _LIBRARY.load()
    return lib is not None and bool(lib.ditto_lut_has_avx512())


def _isa_code(isa: str | None) -> int:
    if isa not in _ISA:
        raise ValueError(f"unknown isa {isa!r}; expected one of: None, 'portable', 'avx512'")
    if isa == "avx512" and not has_avx512():
        raise ValueError("isa='avx512': this CPU lacks AVX-512 F/BW/VL/DQ + VBMI + VNNI + GFNI")
    return _ISA[isa]


def _kind_code(kind: str) -> int:
    if kind not in _KIND:
        raise ValueError(f"the LUT kernel supports {', '.join(KINDS)}, not {kind!r}")
    return _KIND[kind]


def _as_u8(weight: np.ndarray | torch.Tensor) -> torch.Tensor:
    w = weight if isinstance(weight, torch.Tensor) else torch.from_numpy(np.asarray(weight))
    if w.dtype != torch.uint8 or w.dim() != 2 or w.device.type != "cpu":
        raise ValueError(f"weight: a 2-D uint8 CPU array of GGUF blocks expected, got {w.dtype} {tuple(w.shape)}")
    return w if w.is_contiguous() else w.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"x: a 2-D (M, K) CPU tensor expected, got {tuple(x.shape)} on {x.device}")
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    return x


@dataclass(frozen=True)
class LutWeight:
    """A Q4_0 / Q4_1 weight in the LUT kernel's bit-plane layout (see `repack`)."""

    data: torch.Tensor  # uint8 (ceil(N/16) * K/32 * block bytes,)
    kind: str
    n: int
    k: int


def repack(weight: np.ndarray | torch.Tensor, kind: str) -> LutWeight:
    """File rows uint8 (N, row_bytes) -> T-MAC's bit-plane layout, per tile of 16 rows and block: 4 x 64
    index bytes (byte 4r + j: row r's plane-j patterns of groups 2z and 2z + 1, one per nibble), then
    the 16 rows' fp16 d (and m). The same bytes per row as the file (rows padded to a multiple of 16)."""
    code = _kind_code(kind)
    w = _as_u8(weight)
    n, rb = w.shape
    per = gguf_reference.BLOCKS[kind][1]
    if rb % per:
        raise ValueError(f"{kind} rows are whole blocks of {per} bytes, not {rb}")
    k = rb // per * 32
    lib = _lib()
    out = torch.empty(max(lib.ditto_lut_packed_bytes(code, n, k), 0), dtype=torch.uint8)
    if lib.ditto_lut_repack(code, w.data_ptr(), n, rb, out.data_ptr()) != 0:
        raise ValueError(f"repack failed for {kind} {tuple(w.shape)}")
    return LutWeight(out, kind, n, k)


def quantize_activations(x: torch.Tensor, *, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's A32 activation quantisation: x (M, K) -> q int8 (M, K), dx fp32 (M, K/32), sx int32 (M, K/32)
    (the reference's `quantize_activations(x, 32)` with sx = its two 16-sums added)."""
    isa_code = _isa_code(isa)
    x = _rows(x)
    m, k = x.shape
    if k % 32:
        raise ValueError(f"K={k} is not a multiple of the activation block 32")
    q = torch.empty(m, k, dtype=torch.int8)
    dx = torch.empty(m, k // 32, dtype=torch.float32)
    sx = torch.empty(m, k // 32, dtype=torch.int32)
    if _lib().ditto_lut_quantize(isa_code, x.data_ptr(), m, k, x.stride(0), q.data_ptr(), dx.data_ptr(), sx.data_ptr()):
        raise ValueError("quantize failed")
    return q, dx, sx


def build_tables(x: torch.Tensor, *, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first step of `lut_linear` alone (to time it): x (M, K) -> tables uint8 (M, K/32, 256) in the
    layout of `isa`'s kernels, dx fp32 (M, K/32), sx int32 (M, K/32)."""
    isa_code = _isa_code(isa)
    x = _rows(x)
    m, k = x.shape
    if k % 32:
        raise ValueError(f"K={k} is not a multiple of the activation block 32")
    tab = torch.empty(m, k // 32, 256, dtype=torch.uint8)
    dx = torch.empty(m, k // 32, dtype=torch.float32)
    sx = torch.empty(m, k // 32, dtype=torch.int32)
    if _lib().ditto_lut_tables(isa_code, x.data_ptr(), m, k, x.stride(0), tab.data_ptr(), dx.data_ptr(), sx.data_ptr()):
        raise ValueError("table build failed")
    return tab, dx, sx


def lut_linear(
    x: torch.Tensor,
    weight: np.ndarray | torch.Tensor | LutWeight,
    kind: str,
    bias: torch.Tensor | None = None,
    *,
    isa: str | None = None,
) -> torch.Tensor:
    """y = x @ W^T under the `gguf` contract, via lookup tables; x fp32 (M, K), weight the file's rows
    uint8 (N, row_bytes) or a `LutWeight`, kind Q4_0 or Q4_1 -> fp32 (M, N), bit-identical to
    `gguf_reference.linear(x, weight, kind, bias)`."""
    code = _kind_code(kind)
    isa_code = _isa_code(isa)
    x = _rows(x)
    m, k = x.shape
    if isinstance(weight, LutWeight):
        if weight.kind != kind:
            raise ValueError(f"a {weight.kind} LutWeight passed as {kind}")
        if weight.k != k:
            raise ValueError(f"x has K={k} inputs but the weight {weight.k}")
        w, n, rb, layout = weight.data, weight.n, 0, _PACKED
    else:
        w = _as_u8(weight)
        n, rb = w.shape
        if k % 32:
            raise ValueError(f"K={k} is not a multiple of the {kind} block of 32")
        if rb != k // 32 * _BLOCK_BYTES[kind]:
            raise ValueError(f"{kind} weight rows of {rb} bytes do not hold K={k} inputs")
        layout = _FILE
    b = None
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for {n} outputs")
        b = bias.detach().to(device="cpu", dtype=torch.float32).contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    rc = _lib().ditto_lut_linear(
        code,
        layout,
        isa_code,
        x.data_ptr(),
        m,
        k,
        x.stride(0),
        w.data_ptr(),
        n,
        rb,
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        n,
    )
    if rc == -2:
        raise MemoryError("gguf LUT kernel: out of memory for the tables")
    if rc != 0:
        raise ValueError(f"gguf LUT kernel rejected {kind} x {tuple(x.shape)} w {tuple(w.shape)} (isa {isa})")
    return y


_ARGS = threading.local()  # per-thread argument arrays: ctypes releases the GIL during a call


class LutCall:
    """`lut_linear(x, weight, kind, bias)` for one repacked weight, bound once: a call checks only what
    can change (x fp32, contiguous, 2-D, K wide), fills one int64 argument array and makes one ctypes
    call (single-stream decode makes ~120 such calls a token). Anything else goes to `lut_linear`."""

    def __init__(self, weight: LutWeight, bias: torch.Tensor | None = None):
        self.weight, self.kind = weight, weight.kind
        self.bias = None if bias is None else bias.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if self.bias is not None and self.bias.shape != (weight.n,):
            raise ValueError(f"bias of shape {tuple(self.bias.shape)} for {weight.n} outputs")
        self._fixed = (_kind_code(self.kind), _PACKED, _ISA[None])
        self._w, self._b = weight.data.data_ptr(), 0 if self.bias is None else self.bias.data_ptr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.weight.k or not x.is_contiguous():
            return lut_linear(x, self.weight, self.kind, self.bias)
        m, n = x.shape[0], self.weight.n
        y = torch.empty(m, n, dtype=torch.float32)
        a = getattr(_ARGS, "lut", None)
        if a is None:
            a = _ARGS.lut = (ctypes.c_int64 * 13)()
        a[0], a[1], a[2] = self._fixed
        a[3], a[4], a[5], a[6] = x.data_ptr(), m, self.weight.k, self.weight.k
        a[7], a[8], a[9], a[10], a[11], a[12] = self._w, n, 0, self._b, y.data_ptr(), n
        rc = _lib().ditto_lut_linear_packed(a)
        if rc:
            raise (
                MemoryError("gguf LUT kernel: out of memory")
                if rc == -2
                else ValueError(f"LUT kernel rejected {x.shape}")
            )
        return y
