"""A linear layer computed directly on a GGUF file's weight blocks, bit for bit `gguf_reference.linear`.

The C kernel (ditto/csrc/gguf_blocks.c, built once by `cbuild.CLibrary` and cached) quantises the
activations to 8-bit blocks (A32 / A256) and multiplies them with the file's own weight rows (a
uint8 view of the mapped file, never repacked) for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and
Q6_K. Every output element is the contract's single fp32 chain over its row's blocks, so the result
is the same whatever M, the row's position in the batch, the thread count (torch.set_num_threads:
OpenMP comes from torch's libgomp) or the instruction-set path:

* ``avx512``: AVX-512 F/BW/VL, with VNNI (vpdpbusd) where the CPU has it;
* ``avx512_novnni``: the same without VNNI (listed only on CPUs with VNNI, for tests);
* ``avx2``: AVX2 + F16C (maddubs);
* ``portable``: plain C.

The best path this CPU runs is the default; ``DITTO_GGUF_ISA=avx512|avx512_novnni|avx2|portable``
forces one, and so does the ``isa`` argument (tests call every path in one process). The library
is compiled without -march=native (the vector paths use per-function targets) and with
-ffp-contract=off. Without a usable compiler, or with DITTO_GGUF_DISABLE_KERNEL set,
`block_linear` and `quantize_activations` run `gguf_reference` instead: the same bits, slowly.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch

from ditto.numerics.kernels import gguf_reference as ref
from ditto.numerics.kernels.cbuild import CLibrary

__all__ = [
    "ISA_ENV",
    "KINDS",
    "block_linear",
    "isa_paths",
    "kernel_available",
    "kernel_status",
    "quantize_activations",
]

KINDS = ref.KINDS
ISA_ENV = "DITTO_GGUF_ISA"
DISABLE_ENV = "DITTO_GGUF_DISABLE_KERNEL"
_KIND_ID = {kind: i for i, kind in enumerate(KINDS)}  # enum order of csrc/gguf_blocks.c
# kind -> (id, values per block, bytes per block, activation block)
_KIND_INFO = {kind: (i, *ref.BLOCKS[kind][:2], ref.activation_block(kind)) for i, kind in enumerate(KINDS)}
_PORTABLE, _AVX2, _AVX512, _AVX512VNNI = 1, 2, 3, 4
_ERRORS = {-1: "the kernel rejected its arguments", -2: "out of memory"}
_BAD_ENV = -3  # $DITTO_GGUF_ISA names no path this CPU runs (read by the C library, at each call)
_ARGS = threading.local()  # per-thread argument arrays: ctypes releases the GIL during a call


def _linear_args() -> ctypes.Array:
    args = getattr(_ARGS, "linear", None)
    if args is None:
        args = _ARGS.linear = (ctypes.c_int64 * 12)()
    return args


def _setup(lib: ctypes.CDLL) -> str | None:
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.ditto_gguf_isa_supported.argtypes = [i]
    lib.ditto_gguf_isa_supported.restype = i
    lib.ditto_gguf_best_isa.argtypes = []
    lib.ditto_gguf_best_isa.restype = i
    lib.ditto_gguf_quantize.argtypes = [p, n, n, n, i, i, p, p, p]
    lib.ditto_gguf_quantize.restype = i
    lib.ditto_gguf_gemm.argtypes = [i, i, p, p, p, n, n, p, n, n, p, p, n]
    lib.ditto_gguf_gemm.restype = i
    lib.ditto_gguf_linear.argtypes = [i, i, p, n, n, n, p, n, n, p, p, n]
    lib.ditto_gguf_linear.restype = i
    lib.ditto_gguf_linear_packed.argtypes = None  # one int64 array (see _linear_args)
    lib.ditto_gguf_linear_packed.restype = i
    lib.ditto_gguf_selftest.restype = i
    lib.ditto_gguf_dequantize.argtypes = [i, p, n, p]
    lib.ditto_gguf_dequantize.restype = i
    if lib.ditto_gguf_selftest() != 1:
        return "kernel self-test failed (fp32 a*b+c contracted to an FMA: vector and portable paths differ)"
    return None


_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
_LIBRARY = CLibrary("gguf_blocks.c", DISABLE_ENV, _setup, _FLAGS)


def _lib() -> ctypes.CDLL | None:
    return _LIBRARY.load()


def kernel_available() -> bool:
    """True when the compiled kernel is usable (builds it on first call)."""
    return _lib() is not None


def kernel_status() -> str:
    """'ok' or the reason the kernel is unavailable (for manifests / logs)."""
    return _LIBRARY.status()


_PATHS: dict[str, int] | None = None


def _paths() -> dict[str, int]:
    """Path name -> the C library's ISA code, for the paths this CPU runs (best first)."""
    global _PATHS
    lib = _lib()
    if lib is None:
        return {}
    if _PATHS is None:
        out: dict[str, int] = {}
        if lib.ditto_gguf_isa_supported(_AVX512VNNI):
            out["avx512"] = _AVX512VNNI
            out["avx512_novnni"] = _AVX512
        elif lib.ditto_gguf_isa_supported(_AVX512):
            out["avx512"] = _AVX512
        if lib.ditto_gguf_isa_supported(_AVX2):
            out["avx2"] = _AVX2
        out["portable"] = _PORTABLE
        _PATHS = out
    return _PATHS


def isa_paths() -> tuple[str, ...]:
    """The instruction-set paths this CPU can run, best first (empty without the kernel)."""
    return tuple(_paths())


def _isa_code(isa: str | None) -> int:
    """The ISA code for `isa`, else $DITTO_GGUF_ISA, else 0 (the library picks the best path)."""
    name = isa if isa is not None else os.environ.get(ISA_ENV) or None
    if name is None:
        return 0
    paths = _paths()
    if name not in paths:
        where = f"{ISA_ENV}={name!r}" if isa is None else f"isa={name!r}"
        known = "avx512, avx512_novnni, avx2, portable"
        raise ValueError(f"{where}: not a path this CPU runs ({', '.join(paths) or 'no kernel'}; known: {known})")
    return paths[name]


def _as_f32_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., K) floating -> contiguous fp32 (M, K), with K checked against the activation block."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    if x.device.type != "cpu":
        raise ValueError(f"x must be on the CPU, got {x.device}")
    k = x.shape[-1]
    if k == 0 or k % block:
        raise ValueError(f"K={k} is not a positive multiple of the activation block {block}")
    return x.reshape(-1, k).to(torch.float32).contiguous()


def quantize_activations(
    x: torch.Tensor, block: int, *, isa: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> q int8 (M, K/block, block), dx fp32 (M, K/block), sums int32 (M, K/block, block/16):
    `gguf_reference.quantize_activations`, bit for bit."""
    if block not in (32, 256):
        raise ValueError(f"activation blocks are 32 (A32) or 256 (A256), not {block}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    xr = _as_f32_rows(x, block)
    lib = _lib()
    if lib is None:
        if isa is not None:
            _isa_code(isa)  # an explicit path without the kernel is an error
        return ref.quantize_activations(xr, block)
    m, k = xr.shape
    q = torch.empty(m, k // block, block, dtype=torch.int8)
    dx = torch.empty(m, k // block, dtype=torch.float32)
    sums = torch.empty(m, k // block, block // 16, dtype=torch.int32)
    if m:
        rc = lib.ditto_gguf_quantize(
            xr.data_ptr(),
            m,
            k,
            k,
            block,
            0 if isa is None else _isa_code(isa),
            q.data_ptr(),
            dx.data_ptr(),
            sums.data_ptr(),
        )
        if rc == _BAD_ENV:
            _isa_code(None)
        if rc:
            raise RuntimeError(f"ditto_gguf_quantize failed ({rc}: {_ERRORS.get(rc, 'unknown')})")
    return q, dx, sums


DEQUANT_KINDS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray | None:
    """A 32-value block format's bytes (uint8, whole blocks) -> float32 (blocks, 32), bit for bit the
    gguf package's decoder (the loader's numpy path); None when the kernel is unavailable."""
    if kind not in DEQUANT_KINDS:
        raise ValueError(f"the C decoder reads {', '.join(DEQUANT_KINDS)}, not {kind}")
    lib = _lib()
    if lib is None:
        return None
    size = ref.BLOCKS[kind][1]
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size % size:
        raise ValueError(f"{kind} data must be uint8 whole blocks of {size} bytes, got {raw.dtype} {raw.shape}")
    raw = np.ascontiguousarray(raw)
    out = np.empty((raw.size // size, 32), dtype=np.float32)
    if lib.ditto_gguf_dequantize(_KIND_ID[kind], raw.ctypes.data, out.shape[0], out.ctypes.data):
        raise RuntimeError(f"ditto_gguf_dequantize rejected {kind}")
    return out


def block_linear(
    x: torch.Tensor,
    weight: torch.Tensor | np.ndarray,
    kind: str,
    bias: torch.Tensor | None = None,
    *,
    isa: str | None = None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) under the gguf contract, straight from the file's blocks.

    x: floating (M, K) (any leading dims: (..., K) -> (..., N)); weight: uint8 (N, row_bytes), the
    tensor's rows as stored in the GGUF file (row-major, contiguous); kind: its ggml type ("Q4_1",
    ...); bias: (N,) or None; isa: force an instruction-set path (see `isa_paths`). Returns fp32."""
    info = _KIND_INFO.get(kind)
    if info is None:
        raise ValueError(f"no gguf block kernel for {kind!r}; supported: {', '.join(KINDS)}")
    kind_id, per, size, block = info
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(weight)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.uint8:
        raise TypeError(
            f"weight must be a uint8 tensor of raw {kind} blocks, got {getattr(weight, 'dtype', type(weight))}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, row_bytes), got shape {tuple(weight.shape)}")
    if not weight.is_cpu:
        raise ValueError(f"weight must be on the CPU, got {weight.device}")
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() and x.is_cpu:
        xr = x  # the common case, without a copy
        lead, k = (x.shape[0],), x.shape[1]
        if k == 0 or k % block:
            raise ValueError(f"K={k} is not a positive multiple of the activation block {block}")
    else:
        lead, k = tuple(x.shape[:-1]), x.shape[-1] if x.dim() else 0
        xr = _as_f32_rows(x, block)
    n, rb = weight.shape
    if rb != k // per * size:
        raise ValueError(f"{kind} weight rows of {rb} bytes do not hold K={k} inputs ({k // per * size} bytes)")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (the file's rows, row-major); got strides " + str(weight.stride()))
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        bias = bias.to(torch.float32).contiguous()
    lib = _LIBRARY.lib or _lib()
    if lib is None:
        if isa is not None:
            _isa_code(isa)  # an explicit path without the kernel is an error, not a silent fallback
        return ref.linear(xr, weight, kind, bias).reshape(*lead, n)
    code = 0 if isa is None else _isa_code(isa)  # 0: the library reads $DITTO_GGUF_ISA itself
    m = xr.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        args = _linear_args()
        args[:] = (
            kind_id,
            code,
            xr.data_ptr(),
            m,
            k,
            k,
            weight.data_ptr(),
            n,
            rb,
            0 if bias is None else bias.data_ptr(),
            y.data_ptr(),
            n,
        )
        rc = lib.ditto_gguf_linear_packed(args)
        if rc:
            if rc == _BAD_ENV:
                _isa_code(None)  # raises the ValueError that names the variable
            raise RuntimeError(f"ditto_gguf_linear failed ({rc}: {_ERRORS.get(rc, 'unknown')})")
    elif code == 0 and ISA_ENV in os.environ:
        _isa_code(None)
    return y if len(lead) == 1 else y.reshape(*lead, n)
