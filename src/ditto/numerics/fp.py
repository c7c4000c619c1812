"""Float modes: fp32, bf16, fp16 — weights, norms, embeddings and activations in one dtype.

Linears stay nn.Linear (cast in place, so a tied lm_head keeps sharing the embedding's
Parameter). On CPU, torch's bf16/fp16 GEMMs accumulate in fp32 and round the output once to
the dtype. RMSNorm always computes in fp32 and rounds its output back (ditto.models.layers).
fp16 can overflow on models trained in bf16 (Gemma's activations exceed 65504): use bf16 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditto.numerics.base import NumericsMode, _cast_param_, register


@dataclass(frozen=True)
class FloatMode(NumericsMode):
    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        _cast_param_(linear.weight, self.act_dtype)
        _cast_param_(linear.bias, self.act_dtype)
        return linear


FP32 = register(
    FloatMode("fp32", torch.float32, "fp32", "fp32", torch.float32, torch.float32, "reference: everything float32")
)
BF16 = register(
    FloatMode(
        "bf16",
        torch.bfloat16,
        "bf16",
        "bf16",
        torch.bfloat16,
        torch.bfloat16,
        "weights, activations and KV in bfloat16 (fp32 GEMM accumulation)",
    )
)
FP16 = register(
    FloatMode(
        "fp16",
        torch.float16,
        "fp16",
        "fp16",
        torch.float16,
        torch.float16,
        "weights, activations and KV in float16 (fp32 GEMM accumulation)",
    )
)
