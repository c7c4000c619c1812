"""The `gguf` numerics contract, written plainly in torch: a linear computed on a GGUF file's own blocks.

This module is the specification the C kernels (csrc/gguf_blocks.c, csrc/gguf_lut.c) must meet bit
for bit, and the path used where no C compiler is available. It is slow (a Python loop over blocks)
and meant for tests and fallbacks, never for speed.

Activations are quantised on the fly, as llama.cpp does, to 8-bit blocks:

* ``A32`` (weights Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): per block of 32 inputs, ``amax = max|x|``,
  ``dx = amax / 127`` and ``q = rint(x * (127 / amax))`` (each an fp32 IEEE operation: one division
  127 / amax, one multiply, round half to even; scale 0 when amax = 0; a NaN product becomes 0),
  clamped to [-127, 127] int8, plus ``sx = sum(q)``.
* ``A256`` (weights Q4_K, Q5_K, Q6_K): the same per super-block of 256 inputs, plus ``bsum``, the
  sum of q over each 16 inputs.

Every weight block then meets its activation block in integers, which is exact whatever the order
of the additions (SIMD lanes, lookup tables):

* Q8_0 / Q4_0 / Q5_0 (``w = d * v`` with v = q, n - 8, n - 16): ``isum = sum(v * q)``.
* Q4_1 / Q5_1 (``w = d * n + m``): ``isum = sum(n * q)`` and the activation sum ``sx``.
* Q4_K / Q5_K (``w = d * sc_j * n - dmin * m_j`` over 8 sub-blocks of 32):
  ``A = sum_j sc_j * sum(n * q over j)`` and ``B = sum_j m_j * sum(q over j)``.
* Q6_K (``w = d * sc_j * (n - 32)`` over 16 sub-blocks of 16): ``A = sum_j sc_j * sum((n - 32) * q)``.

The floating-point part is one fixed chain per output element y[m, n], over the row's blocks in
order b = 0, 1, ..., starting from +0.0f, every operation an fp32 IEEE multiply or add (no FMA):

    A32:   acc = acc + (d_b * dx_b) * float(isum_b)        [Q4_1/Q5_1 then: acc = acc + (m_b * dx_b) * float(sx_b)]
    A256:  acc = acc + (d_b * dx_b) * float(A_b)           [Q4_K/Q5_K then: acc = acc - (dmin_b * dx_b) * float(B_b)]
    y = acc (+ bias[n], an fp32 add, when the layer has a bias)

(`float(int)` rounds to nearest even.) Nothing in the chain depends on M, the row's position in
the batch, the thread count or the instruction set, so the result is batch invariant and the same
on every x86 or ARM CPU: the contract is bitwise.
"""

from __future__ import annotations

import numpy as np
import torch

# ggml block layouts: kind -> (values per block, bytes per block, activation format)
BLOCKS: dict[str, tuple[int, int, str]] = {
    "Q4_0": (32, 18, "A32"),
    "Q4_1": (32, 20, "A32"),
    "Q5_0": (32, 22, "A32"),
    "Q5_1": (32, 24, "A32"),
    "Q8_0": (32, 34, "A32"),
    "Q4_K": (256, 144, "A256"),
    "Q5_K": (256, 176, "A256"),
    "Q6_K": (256, 210, "A256"),
}
KINDS = tuple(BLOCKS)


def activation_block(kind: str) -> int:
    """Inputs per activation block for a weight kind: 32 (A32) or 256 (A256)."""
    return 32 if BLOCKS[kind][2] == "A32" else 256


def row_bytes(kind: str, k: int) -> int:
    """Bytes of one weight row of `k` inputs."""
    per, size, _ = BLOCKS[kind]
    if k % per:
        raise ValueError(f"{kind} rows hold multiples of {per} values, not {k}")
    return k // per * size


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 -> q int8 (M, K/block, block), dx fp32 (M, K/block), sums int32 (M, K/block, block/16).

    `sums` holds sum(q) over each 16 inputs (A256's bsum; A32 adds its two halves for sx)."""
    m, k = x.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the activation block {block}")
    xb = x.float().reshape(m, k // block, block)  # (M, blocks, block)
    amax = xb.abs().amax(-1)
    dx = amax / 127.0
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    # one IEEE division 127 / amax, as documented (torch's `127.0 / t` is reciprocal(t) * 127: two roundings)
    scale = torch.where(amax > 0, torch.full_like(amax, 127.0) / safe, torch.zeros_like(amax))
    # NaN (x * scale for x = 0 with an infinite scale, i.e. amax < 127 / FLT_MAX, or a NaN/inf input)
    # becomes 0 explicitly: a float NaN cast to int8 is undefined
    q = torch.round(xb * scale[..., None]).nan_to_num_(0.0).clamp_(-127, 127).to(torch.int8)
    sums = q.to(torch.int32).reshape(m, k // block, block // 16, 16).sum(-1, dtype=torch.int32)
    return q, dx, sums


# ---------------------------------------------------------------------------------------------
# weights: decode a row-major block array into integers and scales
# ---------------------------------------------------------------------------------------------


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of every block (blocks, ...) as fp32 (blocks,)."""
    return np.ascontiguousarray(raw[..., start : start + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32): byte j holds value j in its low nibble and value j + 16 in its high."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def decode(raw: np.ndarray, kind: str, k: int) -> dict[str, np.ndarray]:
    """Weight blocks uint8 (N, row_bytes) -> integer values and scales, per row and block.

    Keys: ``v`` int32 (N, nb, per) the integer each weight multiplies (signed for Q4_0/Q5_0/Q8_0/Q6_K,
    unsigned otherwise), ``d`` fp32 (N, nb), and by kind ``m`` fp32 (N, nb) (Q4_1/Q5_1),
    ``sc`` int32 (N, nb, sub) sub-block scales and ``mins`` int32 (N, nb, sub) (Q4_K/Q5_K: ``dmin``
    fp32 (N, nb)). Q6_K: ``sc`` int32 (N, nb, 16)."""
    per, size, _ = BLOCKS[kind]
    n = raw.shape[0]
    nb = k // per
    b = np.ascontiguousarray(raw).reshape(n, nb, size)  # (N, blocks, bytes)
    out: dict[str, np.ndarray] = {"d": _f16(b, 0)}
    if kind == "Q8_0":
        out["v"] = b[..., 2:].view(np.int8).astype(np.int32)
    elif kind == "Q4_0":
        out["v"] = _nibbles(b[..., 2:]).astype(np.int32) - 8
    elif kind == "Q4_1":
        out["m"] = _f16(b, 2)
        out["v"] = _nibbles(b[..., 4:]).astype(np.int32)
    elif kind in ("Q5_0", "Q5_1"):
        off = 2 if kind == "Q5_0" else 4
        if kind == "Q5_1":
            out["m"] = _f16(b, 2)
        qh = np.ascontiguousarray(b[..., off : off + 4]).view(np.uint32)  # (N, nb, 1)
        high = (qh >> np.arange(32, dtype=np.uint32)) & 1  # (N, nb, 32): bit j is value j's fifth bit
        v = _nibbles(b[..., off + 4 :]).astype(np.int32) | (high.astype(np.int32) << 4)
        out["v"] = v - 16 if kind == "Q5_0" else v
    elif kind in ("Q4_K", "Q5_K"):
        out["dmin"] = _f16(b, 2)
        s = b[..., 4:16].astype(np.int32).reshape(n, nb, 3, 4)
        lo, hi, mix = s[..., 0, :], s[..., 1, :], s[..., 2, :]
        out["sc"] = np.concatenate([lo & 63, (mix & 15) | ((lo >> 2) & 48)], axis=-1)  # (N, nb, 8)
        out["mins"] = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 2) & 48)], axis=-1)
        if kind == "Q4_K":
            qs = b[..., 16:].reshape(n, nb, 4, 32)  # 4 x 32 bytes: sub-block 2i low nibbles, 2i + 1 high
            v = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, nb, 256)
        else:
            qh = b[..., 16:48]  # (N, nb, 32): bit i of byte j is the fifth bit of sub-block i's value j
            qs = b[..., 48:].reshape(n, nb, 4, 32)
            low = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, nb, 8, 32)
            high = (qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1
            v = (low | (high << 4)).reshape(n, nb, 256)
        out["v"] = v.astype(np.int32)
    elif kind == "Q6_K":
        ql = b[..., :128].reshape(n, nb, 2, 64)  # two halves of 128 values
        qh = b[..., 128:192].reshape(n, nb, 2, 32)
        out["sc"] = b[..., 192:208].view(np.int8).astype(np.int32)  # (N, nb, 16)
        out["d"] = _f16(b, 208)
        # ql: value l of quarter 0 <- ql[l] low, 1 <- ql[l + 32] low, 2 <- ql[l] high, 3 <- ql[l + 32] high
        low = np.stack([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3)
        high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=3)  # (N, nb, 2, 4, 32)
        v = (low.astype(np.int32) | (high.astype(np.int32) << 4)) - 32
        out["v"] = v.reshape(n, nb, 256)
    else:
        raise ValueError(f"no gguf kernel for {kind}; supported: {', '.join(KINDS)}")
    return out


def dequantize(raw: np.ndarray, kind: str, k: int) -> np.ndarray:
    """fp32 (N, K) weights recombined from `decode`, with the same operations (and so the same bits)
    as the `gguf` package's dequantisation."""
    p = decode(raw, kind, k)
    n = raw.shape[0]
    v = p["v"].astype(np.float32)
    if kind in ("Q8_0", "Q4_0", "Q5_0"):
        w = p["d"][..., None] * v
    elif kind in ("Q4_1", "Q5_1"):
        w = p["d"][..., None] * v + p["m"][..., None]
    elif kind in ("Q4_K", "Q5_K"):
        scale = (p["d"][..., None] * p["sc"].astype(np.float32))[..., None]  # (N, nb, 8, 1)
        low = (p["dmin"][..., None] * p["mins"].astype(np.float32))[..., None]
        w = scale * v.reshape(n, -1, 8, 32) - low
    else:  # Q6_K
        scale = (p["d"][..., None] * p["sc"].astype(np.float32))[..., None]  # (N, nb, 16, 1)
        w = scale * v.reshape(n, -1, 16, 16)
    return w.reshape(n, k)


# ---------------------------------------------------------------------------------------------
# the linear
# ---------------------------------------------------------------------------------------------


def _isum(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact integer dot of every activation row with every weight row, per block.

    q (M, nb, per), v (N, nb, per) integers -> int64 (M, N, nb); float64 sums of integers below 2^53
    are exact whatever the order."""
    return torch.einsum("mbi,nbi->mnb", q.double(), v.double()).to(torch.int64)


def linear(
    x: torch.Tensor, raw: np.ndarray | torch.Tensor, kind: str, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W^T under the contract above; x (M, K) fp32, raw uint8 (N, row_bytes) -> (M, N) fp32."""
    raw = raw.numpy() if isinstance(raw, torch.Tensor) else raw
    m, k = x.shape
    n = raw.shape[0]
    if raw.shape[1] != row_bytes(kind, k):
        raise ValueError(f"{kind} weight rows of {raw.shape[1]} bytes do not hold K={k} inputs")
    p = {key: torch.from_numpy(np.ascontiguousarray(val)) for key, val in decode(raw, kind, k).items()}
    block = activation_block(kind)
    q, dx, sums = quantize_activations(x, block)
    acc = torch.zeros(m, n, dtype=torch.float32)
    if m == 0 or n == 0:
        return acc
    if block == 32:
        isum = _isum(q, p["v"]).float()  # (M, N, nb)
        sx = sums.sum(-1).float()  # (M, nb)
        for b in range(k // 32):
            acc = acc + (p["d"][None, :, b] * dx[:, None, b]) * isum[..., b]
            if "m" in p:
                acc = acc + (p["m"][None, :, b] * dx[:, None, b]) * sx[:, None, b]
    else:
        sub = 32 if kind in ("Q4_K", "Q5_K") else 16
        nsub = 256 // sub
        nb = k // 256
        qs = q.reshape(m, nb * nsub, sub)
        partial = _isum(qs, p["v"].reshape(n, nb * nsub, sub)).reshape(m, n, nb, nsub)  # per sub-block
        a = (partial * p["sc"][None].long()).sum(-1).float()  # (M, N, nb): exact integer sums
        if kind != "Q6_K":
            subsum = sums.reshape(m, nb, nsub, sub // 16).sum(-1).long()  # (M, nb, 8): sum(q) per sub-block
            bmin = (subsum[:, None] * p["mins"][None].long()).sum(-1).float()  # (M, N, nb)
        for b in range(nb):
            acc = acc + (p["d"][None, :, b] * dx[:, None, b]) * a[..., b]
            if kind != "Q6_K":
                acc = acc - (p["dmin"][None, :, b] * dx[:, None, b]) * bmin[..., b]
    if bias is not None:
        acc = acc + bias.float()
    return acc
