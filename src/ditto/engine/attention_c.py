"""Fused C kernel for float paged attention on CPU: every query row computed one fixed way.

One work item is (query row, kv head): the G query heads of the group read each visible key and
value straight from the paged cache (fp32, bf16 or fp16; no gathered copies), in position order:

- score of key l: one sequential `fmaf` chain over the head dimension d = 0..D-1 (vectorised across
  the keys of a block, which are independent chains);
- softmax: max over the visible keys, e_l = exp(s_l - max) (our own fmaf polynomial, not libm), their
  sum added in key order;
- output: sum_l e_l v_l as one `fmaf` chain per channel in key order, divided by the sum at the end.

Nothing in that order depends on the other rows, their number, the row's place in the batch, the
thread count, or whether the row is a decode step or a token of a prefill chunk of any length, so
the kernel keeps the `batch_invariant` contract by construction (and decode and prefill agree bit
for bit). Masked keys are simply not visited (a row sees [max(0, pos - window + 1), pos]).

The C source is ditto/csrc/float_attention.c, built at first use with the system C compiler
(`cbuild`); without one, or with DITTO_ATTN_DISABLE_KERNEL=1, `kernel_available()` is False and
PagedAttention keeps its torch path.
"""

from __future__ import annotations

import ctypes

import torch

from ditto.numerics.kernels.cbuild import CLibrary

__all__ = ["attend", "check_rows", "kernel_available", "kernel_status", "supports"]


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _setup(lib: ctypes.CDLL) -> str | None:
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.ditto_attend.argtypes = [p, n, n, n, p, p, n, ctypes.c_int, n, p, p, p, n, p, n, p]
    lib.ditto_attend.restype = ctypes.c_long
    return None


_LIBRARY = CLibrary("float_attention.c", "DITTO_ATTN_DISABLE_KERNEL", _setup)


def kernel_available() -> bool:
    """True when the compiled attention kernel is usable (builds it on first call)."""
    return _LIBRARY.load() is not None


def kernel_status() -> str:
    return _LIBRARY.status()


def supports(k: torch.Tensor) -> bool:
    """Can the kernel read this cache tensor (CPU, fp32/bf16/fp16)?"""
    return k.device.type == "cpu" and k.dtype in _KINDS and kernel_available()


def check_rows(
    tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, table_row: torch.Tensor, bs: int, t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row description `attend` reads (int64, contiguous), checked against a cache of block size
    bs and t query tokens: done once per step, then every layer calls attend(..., checked=True)."""
    tokens, positions = tokens.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous()
    table, table_row = table.to(torch.int64).contiguous(), table_row.to(torch.int64).contiguous()
    if tokens.numel() and (
        int(positions.max()) >= table.shape[1] * bs
        or int(positions.min()) < 0
        or int(tokens.max()) >= t
        or int(table_row.max()) >= len(table)
    ):
        raise ValueError("attend: a position, token or table row is out of range")
    return tokens, positions, table, table_row


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    table_row: torch.Tensor,
    window: int | None,
    out: torch.Tensor,
    *,
    checked: bool = False,
) -> None:
    """Attention of query rows over one layer's paged cache, written into `out`.

    q, out (T, H, D) fp32 contiguous (q already multiplied by the softmax scale); k (NB, Hkv, D, bs)
    and v (NB, Hkv, bs, D), same dtype. Row i is token tokens[i] at position positions[i]; it sees
    keys [max(0, pos - window + 1), pos], key position p living in block table[table_row[i], p // bs].
    """
    lib = _LIBRARY.load()
    if lib is None:
        raise RuntimeError(f"float attention kernel unavailable: {_LIBRARY.error}")
    t, h, d = q.shape
    nb, hkv, _, bs = k.shape
    if q.dtype != torch.float32 or out.dtype != torch.float32 or out.shape != q.shape or h % hkv:
        raise ValueError(f"attend: q {tuple(q.shape)} {q.dtype}, out {tuple(out.shape)}, {hkv} kv heads")
    if v.shape != (nb, hkv, bs, d) or k.shape[2] != d or v.dtype != k.dtype or k.dtype not in _KINDS:
        raise ValueError(f"attend: k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}")
    if not (q.is_contiguous() and out.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("attend: contiguous tensors expected")
    n = tokens.numel()
    if n == 0:
        return
    if not checked:
        tokens, positions, table, table_row = check_rows(tokens, positions, table, table_row, bs, t)
    win = -1 if window is None else max(0, int(window))
    rc = lib.ditto_attend(
        q.data_ptr(), h, hkv, d, k.data_ptr(), v.data_ptr(), bs, _KINDS[k.dtype],
        n, tokens.data_ptr(), positions.data_ptr(), table.data_ptr(), table.shape[1], table_row.data_ptr(),
        win, out.data_ptr(),
    )  # fmt: skip
    if rc < 0:
        raise MemoryError("float attention kernel: scratch allocation failed")
