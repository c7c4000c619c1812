"""MXINT8 (OCP Microscaling v1.0): blocks of 32 values along K share a power-of-two (E8M0) scale;
elements are int8 with 6 fractional bits. Both weights (stored) and activations (quantised per
token at each linear input) are MXINT8.

Compute: both operands are dequantised to fp32 — exact, since every value is an int8 times a
power of two — and multiplied by an fp32 GEMM. That equals the "exact" MX dot product (int32
block dot products, power-of-two block scaling; tests/test_numerics.py checks both) except for the
order/rounding of the fp32 summation. The weight is dequantised per call (not cached). K is
zero-padded to a multiple of 32 if needed (padded blocks are zero and contribute nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ditto.numerics.base import NumericsMode, register
from ditto.numerics.quant import MX_BLOCK, chunked_linear, dequantize_mxint8, quantize_mxint8


class MXInt8Linear(nn.Module):
    """nn.Linear replacement: q_weight int8 (N, Kp), w_exp int16 (N, Kp/32), bias fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.k_pad = -(-self.in_features // MX_BLOCK) * MX_BLOCK
        if self.k_pad != self.in_features:
            w = F.pad(w, (0, self.k_pad - self.in_features))
        q, e = quantize_mxint8(w)
        self.register_buffer("q_weight", q)
        self.register_buffer("w_exp", e)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_mxint8(self.q_weight, self.w_exp)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        qx, ex = quantize_mxint8(x2)
        y = chunked_linear(
            dequantize_mxint8(qx, ex),
            self.out_features,
            lambda s, e: dequantize_mxint8(self.q_weight[s:e], self.w_exp[s:e]),
            self.bias,
        )
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={MX_BLOCK}"


@dataclass(frozen=True)
class MXInt8Mode(NumericsMode):
    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        return MXInt8Linear(linear)


MXINT8 = register(
    MXInt8Mode(
        "mxint8",
        torch.float32,
        "MXINT8 (int8, 32-blocks, E8M0 scale)",
        "fp32",
        description="weights and activations MXINT8; fp32 accumulation of exact products",
    )
)
