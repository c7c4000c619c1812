"""Fused C kernel for the integer mode's attention (determinism level `exact`), bit-exact with torch.

`attend_paged` computes, for query tokens reading int8 keys/values straight from a paged cache
through a block table, exactly what `integer_ops.attend_int` computes on the gathered keys with
the causal (and sliding-window) mask: the Q.K int8 dot products, the score requantisation
(`rshift_round`, `requantise`, the clamp to +-(2^31 - 1)), `softmax_int` (row max, `exp_neg_fixed`
/ `exp2_neg_fixed` with the same 1025-entry table, one floor reciprocal, rounding to Q.prob_bits)
and the exact P.V sum. Masked keys contribute exact zeros in torch, so the kernel simply visits
the visible keys [max(0, pos - window + 1), pos] of each query; a query with none gets zeros.

Only integer arithmetic runs (int32 dot products and P.V sums whose bounds are checked up front,
int64 everywhere else, wrapping like torch's int64 and with torch's rules for out-of-range shift
counts), so loop order, vectorisation and the OpenMP split cannot change a bit: any machine, any
thread count gives the torch reference's result. One work item is (query token, kv head): the G
query heads of a kv group share each key and value row as it streams through the cache.

The C source is ditto/csrc/integer_attention.c (torch's int64 rules in csrc/ditto_int.h), compiled
at first use with the system C compiler (see `cbuild`); without one, or with
DITTO_INT_DISABLE_KERNEL=1, `kernel_available()` is False and callers use the torch path.
"""

from __future__ import annotations

import ctypes

import torch

from ditto.numerics.kernels import integer_ops as iops
from ditto.numerics.kernels.cbuild import CLibrary

__all__ = ["attend_paged", "check_index", "kernel_available", "kernel_status", "lib", "window_arg"]


def _setup(lib: ctypes.CDLL) -> str | None:
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.ditto_int_attend.argtypes = [p, p, p, n, n, n, p, p, p, p, n, n, p, p, p, n, p, n]
    lib.ditto_int_attend.argtypes += [ctypes.c_int64, ctypes.c_int64, i, i, p, p, i]
    lib.ditto_int_attend.restype = ctypes.c_long
    return None


_LIBRARY = CLibrary("integer_attention.c", "DITTO_INT_DISABLE_KERNEL", _setup)


def kernel_available() -> bool:
    """True when the compiled integer attention kernel is usable (builds it on first call)."""
    return _LIBRARY.load() is not None


def kernel_status() -> str:
    """'ok' or the reason the kernel is unavailable (for manifests / logs)."""
    return _LIBRARY.status()


def _i64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64).contiguous()


def lib() -> ctypes.CDLL:
    """The loaded library, for callers that pass checked, prebuilt arguments straight to C (integer_lean)."""
    lib = _LIBRARY.load()
    if lib is None:
        raise RuntimeError(f"integer attention kernel unavailable: {_LIBRARY.error}")
    return lib


def window_arg(window: int | None) -> int:
    """The kernel's window argument: -1 for none; a window <= 0 shows no key at all."""
    return -1 if window is None else max(0, int(window))


def check_index(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    table_row: torch.Tensor,
    t: int,
    num_blocks: int,
    bs: int,
    prob_bits: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query index of `attend_paged` (n >= 1 queries of T tokens; a cache of num_blocks blocks of bs),
    checked and as contiguous int64 tensors; ValueError on anything a kernel call must not see."""
    positions, tokens, table, table_row = _i64(positions), _i64(tokens), _i64(table), _i64(table_row)
    lmax = int(positions.max()) + 1
    if lmax > table.shape[1] * bs:
        raise ValueError(f"attend_paged: position {lmax - 1} beyond the block table ({table.shape[1]} x {bs})")
    if 127 * ((1 << prob_bits) + lmax) >= 1 << 31:
        raise ValueError("attend_paged: the int32 P.V sum could overflow")  # never for B = 20, L < 2^24
    if (
        int(tokens.min()) < 0
        or int(tokens.max()) >= t
        or int(table_row.min()) < 0
        or int(table_row.max()) >= len(table)
    ):
        raise ValueError("attend_paged: token or table row index out of range")
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_blocks):
        raise ValueError("attend_paged: block id out of range")
    if positions.numel() != tokens.numel() or table_row.numel() != tokens.numel():
        raise ValueError("attend_paged: one position and one table row per query expected")
    return tokens, positions, table, table_row


def attend_paged(
    q: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    table_row: torch.Tensor,
    window: int | None,
    score_m: int,
    score_e: int,
    out: torch.Tensor,
    score_frac: int = 16,
    prob_bits: int = 20,
) -> None:
    """Integer attention of queries over a paged int8 cache, written into `out` (bit-exact `attend_int`).

        q = (q8 (T, H, D) int8, qa16, qsa (T, H, 1) int64) from quantize_rows; cache = (k8 (NB, bs, Hkv, D)
        int8, ka16 (NB, bs, Hkv, 1) int32, ksa (NB, bs, Hkv, 1) int8, v8 (NB, bs, Hkv, D) int8).
        Query i is token tokens[i] at position positions[i]; it sees the keys at positions
        [max(0, pos - window + 1), pos], key position p living in block table[table_row[i], p // bs],
        slot p % bs. out (T, H, D) int64: rows tokens[i] get sum_j p_j v_j with p in Q.prob_bits,
        the other rows are left alone. CPU tensors only. Raises RuntimeError when the kernel is unavailable,
    ValueError on inconsistent inputs (checked before any pointer reaches C).
    """
    lib = _LIBRARY.load()
    if lib is None:
        raise RuntimeError(f"integer attention kernel unavailable: {_LIBRARY.error}")
    q8, qa16, qsa = q
    k8, ka16, ksa, v8 = cache
    t, h, d = q8.shape
    _, bs, kv, _ = k8.shape
    n = tokens.numel()
    if h % kv or v8.shape != k8.shape or k8.shape[-1] != d or out.shape != (t, h, d) or out.dtype != torch.int64:
        raise ValueError(f"attend_paged: shapes q {tuple(q8.shape)}, k {tuple(k8.shape)}, out {tuple(out.shape)}")
    if (q8.dtype, k8.dtype, v8.dtype, ka16.dtype, ksa.dtype) != (torch.int8,) * 3 + (torch.int32, torch.int8):
        raise ValueError("attend_paged: q8/k8/v8 int8, ka16 int32, ksa int8 expected")
    if not (0 <= score_frac <= 40 and 0 <= prob_bits <= 40 and d <= 4096):
        raise ValueError("attend_paged: score_frac, prob_bits in [0, 40] and head dim <= 4096 expected")
    if not out.is_contiguous():
        raise ValueError("attend_paged: out must be contiguous")
    if any(x.device.type != "cpu" for x in (*q, *cache, tokens, positions, table, table_row, out)):
        raise ValueError("attend_paged: CPU tensors expected")
    if n == 0:
        return
    index = check_index(tokens, positions, table, table_row, t, k8.shape[0], bs, prob_bits)
    tokens, positions, table, table_row = index
    win = window_arg(window)
    q8 = q8.contiguous()
    qa, qs = _i64(qa16), _i64(qsa)
    k8, ka16, ksa, v8 = k8.contiguous(), ka16.contiguous(), ksa.contiguous(), v8.contiguous()
    tab = iops._tables("cpu")["exp2"]
    checks = iops._CHECKS
    bad = lib.ditto_int_attend(
        q8.data_ptr(), qa.data_ptr(), qs.data_ptr(), h, kv, d,
        k8.data_ptr(), ka16.data_ptr(), ksa.data_ptr(), v8.data_ptr(), bs,
        n, tokens.data_ptr(), positions.data_ptr(), table.data_ptr(), table.shape[1], table_row.data_ptr(),
        win, score_m, score_e, score_frac, prob_bits, tab.data_ptr(),
        out.data_ptr(), int(checks),
    )  # fmt: skip
    if bad < 0:
        raise MemoryError("integer attention kernel: scratch allocation failed")
    if checks and bad:
        raise OverflowError(f"integer kernel bound violated: attention score requantise ({bad} scores)")
