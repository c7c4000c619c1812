"""W4: group-wise 4-bit weights (weight-only quantisation), dequantised on the fly.

Weights are quantised in groups of `group_size` (32 or 128) consecutive input features,
symmetric (``w = (q-8)*s``) or asymmetric (``w = (q-8)*s + z``), q packed two per byte, with
bf16 scale/zero per group (see quant.quantize_int4_groupwise for the error bounds).

GGUF Q4 weights run without re-quantising: when a linear was loaded from a Q4_0 (``w4``) or
Q4_1 (``w4-asym``) tensor, the layer takes the file's own 4-bit values and block scales
(``linear.q4_source``, set by the loader) instead of quantising the float copy again, so the
4-bit model is the file's, up to the bf16 rounding of the block scale and offset.

Two backends, same stored numbers:

* ``tinygemm`` (default where available): torch.ops.aten._weight_int4pack_mm_for_cpu, which
  dequantises 4-bit weights inside the GEMM. It takes bf16 activations and returns bf16, so a
  w4 linear sees its input rounded to bf16 and rounds its output to bf16 (accumulation is fp32);
  the residual stream, norms and attention stay fp32. With fp32 activations the same op falls
  back to a scalar path ~10-100x slower, so inputs are cast. Measured on the SmolLM2-135M shapes
  it is several times faster than fp32 at M=1 and about fp32 speed at M=64
  (benchmarks/numerics_speed.py). Rows are padded to a multiple of 64 (its packing blocks) and
  K to a multiple of the group (e.g. 576 -> 640 for group 128); padding is zero and sliced off.
* ``dequant``: unpack + dequantise the whole weight to fp32 on every call, then an fp32 GEMM
  (nothing is cached: caching fp32 weights would defeat the point of 4-bit storage). Exact fp32
  activations, but slower; used where the kernel is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ditto.numerics.base import NumericsMode, register
from ditto.numerics.quant import (
    TINYGEMM_BLOCK_N,
    chunked_linear,
    dequantize_int4_groupwise,
    int4_cpu_kernel_available,
    pack_int4,
    pack_int4_tinygemm_cpu,
    quantize_int4_groupwise,
    unpack_int4,
    unpack_int4_tinygemm_cpu,
)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


class W4Linear(nn.Module):
    """nn.Linear replacement: packed uint8 (Np, Kp/2), scales_zeros bf16 (Kp/G, Np, 2), bias fp32."""

    def __init__(self, linear: nn.Linear, group_size: int = 32, symmetric: bool = True, backend: str = "auto"):
        super().__init__()
        if backend == "auto":
            backend = "tinygemm" if int4_cpu_kernel_available() else "dequant"
        if backend not in ("tinygemm", "dequant"):
            raise ValueError(f"unknown w4 backend {backend!r} (tinygemm, dequant)")
        self.backend, self.group_size, self.symmetric = backend, group_size, symmetric
        n, k = linear.weight.shape
        self.out_features, self.in_features = n, k
        self.k_pad = _ceil_to(k, group_size)
        self.n_pad = _ceil_to(n, TINYGEMM_BLOCK_N) if backend == "tinygemm" else n
        source = getattr(linear, "q4_source", None)
        self.source = "float"
        if source is not None and group_size == 32 and source.kind == ("Q4_0" if symmetric else "Q4_1"):
            q, scale, zero = _from_q4_blocks(*source.blocks())  # the file's own 4-bit numbers
            q, scale, zero = _pad_rows(q, scale, zero, self.n_pad - n)
            self.source = f"gguf {source.kind}"
        else:
            w = linear.weight.detach().float()
            if (self.n_pad, self.k_pad) != (n, k):
                w = F.pad(w, (0, self.k_pad - k, 0, self.n_pad - n))
            q, scale, zero = quantize_int4_groupwise(w, group_size, symmetric)
        packed = pack_int4_tinygemm_cpu(q) if backend == "tinygemm" else pack_int4(q)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q uint8 (Np, Kp) in [0, 15], scale bf16 (Np, Kp/G), zero bf16 (Np, Kp/G))."""
        q = unpack_int4_tinygemm_cpu(self.packed) if self.backend == "tinygemm" else unpack_int4(self.packed)
        sz = self.scales_zeros.transpose(0, 1)
        return q, sz[..., 0], sz[..., 1]

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) fp32 weight the layer multiplies by (padding removed)."""
        q, s, z = self.quantized()
        w = dequantize_int4_groupwise(q, s, z, self.group_size)
        return w[: self.out_features, : self.in_features]

    def _dequant_rows(self, start: int, end: int) -> torch.Tensor:
        """fp32 rows start:end of the (padded-K) weight, from the row-major packing (dequant backend)."""
        sz = self.scales_zeros[:, start:end].transpose(0, 1)
        q = unpack_int4(self.packed[start:end])
        return dequantize_int4_groupwise(q, sz[..., 0], sz[..., 1], self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        if self.backend == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_zeros
            )
            if self.n_pad != self.out_features:
                y = y[:, : self.out_features]
            y = y.float()
        else:
            y = chunked_linear(x2.float(), self.out_features, self._dequant_rows)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, {kind}, backend={self.backend}, from={self.source}"
        )


def _from_q4_blocks(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
    """GGUF Q4_0/Q4_1 blocks (``w = q*d + m``) in this layer's form ``(q - 8) * scale + zero``:
    q unchanged, scale = d, zero = m + 8d, both rounded to bf16 (the kernel's scale type; Q4_0 has
    zero = 0 exactly). The only change to the file's weights is that rounding: at most
    ``|q - 8| * ulp(d)/2 + ulp(zero)/2`` per weight, a few percent of one quantisation step."""
    return q, d.bfloat16(), (m + 8 * d).bfloat16()


def _pad_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, extra: int):
    """Append `extra` all-zero output rows (q = 8, scale = zero = 0)."""
    if extra == 0:
        return q, scale, zero
    return F.pad(q, (0, 0, 0, extra), value=8), F.pad(scale, (0, 0, 0, extra)), F.pad(zero, (0, 0, 0, extra))


@dataclass(frozen=True)
class W4Mode(NumericsMode):
    group_size: int = 32
    symmetric: bool = True
    backend: str = "auto"

    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        return W4Linear(linear, self.group_size, self.symmetric, self.backend)


def _w4(name: str, group: int, symmetric: bool) -> W4Mode:
    kind = "symmetric" if symmetric else "asymmetric"
    return register(
        W4Mode(
            name,
            torch.float32,
            f"int4 group {group} {kind} (bf16 scales)",
            "fp32",
            description=f"4-bit weights, groups of {group}, {kind}; bf16 GEMM I/O; fp32 lm_head",
            float_lm_head=True,
            group_size=group,
            symmetric=symmetric,
        )
    )


W4 = _w4("w4", 32, True)  # Q4_0-like
W4_G128 = _w4("w4-g128", 128, True)
W4_ASYM = _w4("w4-asym", 32, False)  # Q4_1-like
W4_G128_ASYM = _w4("w4-g128-asym", 128, False)
