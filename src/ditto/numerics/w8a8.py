"""W8A8: per-output-channel symmetric int8 weights, dynamic per-token symmetric int8 activations,
int32 accumulation with torch._int_mm, rescaled to float.

    y = _int_mm(q_x, q_w.T) * s_x * s_w (+ bias)        s_x: (M, 1) per token, s_w: (N,) per channel

Weights are kept as (N, K) int8 and handed to _int_mm as a transposed view (the fast CPU layout;
torch._int_mm on CPU takes any M, K, N — ditto.numerics.quant.int_mm pads on CUDA). Activations
(fp32 residual stream) are quantised at every linear input; bias is kept in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditto.numerics.base import NumericsMode, register
from ditto.numerics.quant import dequantize_int8, int8_gemm, quantize_int8_symmetric


class Int8Linear(nn.Module):
    """nn.Linear replacement holding q_weight int8 (N, K) and w_scale fp32 (N,)."""

    def __init__(self, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q_weight.shape
        self.register_buffer("q_weight", q_weight.contiguous())
        self.register_buffer("w_scale", w_scale.reshape(-1).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        q, s = quantize_int8_symmetric(linear.weight.detach(), dim=1)
        return cls(q, s, linear.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.q_weight, self.w_scale.unsqueeze(1))

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        qx, sx = quantize_int8_symmetric(x2, dim=-1)
        return int8_gemm(qx, sx, self.q_weight, self.w_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features).float())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@dataclass(frozen=True)
class W8A8Mode(NumericsMode):
    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        return Int8Linear.from_linear(linear)


W8A8 = register(
    W8A8Mode(
        "w8a8",
        torch.float32,
        "int8 per output channel (symmetric)",
        "fp32",
        description="int8 weights x dynamic per-token int8 activations, int32 accumulation; fp32 lm_head",
        float_lm_head=True,
    )
)
