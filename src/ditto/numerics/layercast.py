"""LayerCast ("Give Me FP32 or Give Me Death", 2025): weights stored bf16, all compute in fp32.

Every linear upcasts its bf16 weight (and bias) to fp32 per call and multiplies fp32
activations; the embedding table is bf16 and its lookup is upcast to fp32; norm weights are
stored bf16 and upcast by RMSNorm (which computes in fp32). Memory of bf16, numerics of fp32
up to the one-time bf16 rounding of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditto.numerics.base import NumericsMode, _cast_param_, register
from ditto.numerics.quant import chunked_linear


class LayerCastLinear(nn.Module):
    """y = x_fp32 @ W_bf16.float().T (+ b.float()); keeps the original weight Parameter (tying)."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype = torch.bfloat16):
        super().__init__()
        _cast_param_(linear.weight, storage)
        _cast_param_(linear.bias, storage)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        y = chunked_linear(x2, self.out_features, lambda s, e: self.weight[s:e].float(), b)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight={self.weight.dtype}, compute=float32"
        )


@dataclass(frozen=True)
class LayerCastMode(NumericsMode):
    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        return LayerCastLinear(linear, torch.bfloat16)


LAYERCAST = register(
    LayerCastMode(
        "layercast",
        torch.float32,
        "bf16 (upcast per op)",
        "fp32",
        torch.bfloat16,
        torch.bfloat16,
        "bf16 storage, every op computed in fp32",
    )
)
