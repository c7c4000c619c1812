"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 matmul with fp outlier decomposition.

For an input X (M, K) the outlier feature dimensions are the columns holding any |x| >= threshold
(6.0) anywhere in the batch. Those columns are multiplied in floating point (fp32) against the
matching weight columns; every other column goes through the int8 path: per-row (per-token)
absmax int8 activations times per-output-channel int8 weights with int32 accumulation:

    y = int8(X[:, ~O]) @ int8(W[:, ~O]).T * s_x * s_w  +  X[:, O] @ W_deq[:, O].T

As in bitsandbytes' inference path, only the int8 weights are stored: the outlier weight
columns are the dequantised int8 columns (q_w * s_w), so the fp path is exact in the
activations and carries the same per-channel weight rounding as the int8 path. The activation
row scales are computed after zeroing the outlier columns (which is the point: outliers no
longer inflate the scale of the whole row). Note that the outlier set depends on the batch, so
one row's result depends on its batch-mates (not batch-invariant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditto.numerics.base import NumericsMode, register
from ditto.numerics.quant import int8_gemm, quantize_int8_symmetric
from ditto.numerics.w8a8 import Int8Linear

OUTLIER_THRESHOLD = 6.0


def llm_int8_matmul(
    x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, threshold: float = OUTLIER_THRESHOLD
) -> torch.Tensor:
    """x (M, K) float -> (M, N) fp32 by the LLM.int8 decomposition (see module docstring)."""
    x = x.float()
    cols = (x.abs() >= threshold).any(0).nonzero().squeeze(1)
    if cols.numel():
        x_reg = x.index_fill(1, cols, 0.0)
        qx, sx = quantize_int8_symmetric(x_reg, dim=-1)
        y = int8_gemm(qx, sx, q_weight, w_scale)
        w_out = q_weight.index_select(1, cols).float() * w_scale.reshape(-1, 1)  # (N, n_outliers)
        y += x.index_select(1, cols) @ w_out.t()
        return y
    qx, sx = quantize_int8_symmetric(x, dim=-1)
    return int8_gemm(qx, sx, q_weight, w_scale)


class LLMInt8Linear(Int8Linear):
    def __init__(self, q_weight, w_scale, bias, threshold: float = OUTLIER_THRESHOLD):
        super().__init__(q_weight, w_scale, bias)
        self.threshold = threshold

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = OUTLIER_THRESHOLD):
        q, s = quantize_int8_symmetric(linear.weight.detach(), dim=1)
        return cls(q, s, linear.bias, threshold)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return llm_int8_matmul(x2, self.q_weight, self.w_scale, self.threshold)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}"


@dataclass(frozen=True)
class LLMInt8Mode(NumericsMode):
    threshold: float = OUTLIER_THRESHOLD

    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        return LLMInt8Linear.from_linear(linear, self.threshold)


INT8 = register(
    LLMInt8Mode(
        "int8",
        torch.float32,
        "int8 per output channel + fp outlier columns",
        "fp32",
        description="LLM.int8(): vector-wise int8, fp32 outlier columns (threshold 6.0); fp32 lm_head",
        float_lm_head=True,
        can_be_batch_invariant=False,  # outlier columns are picked from the whole batch
    )
)
