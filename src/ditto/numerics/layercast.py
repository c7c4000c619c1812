"""LayerCast ("Give Me FP32 or Give Me Death", 2025): weights stored bf16, all compute in fp32.

Every linear upcasts its bf16 weight (and bias) to fp32 per call and multiplies fp32
activations; the embedding table is bf16 and its lookup is upcast to fp32; norm weights are
stored bf16 and upcast by RMSNorm (which computes in fp32). Memory of bf16, numerics of fp32
up to the one-time bf16 rounding of the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ditto.numerics.base import NumericsMode, _cast_param_, register
from ditto.numerics.kernels import batch_invariant as bi
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


class PackedLayerCastLinear(nn.Module):
    """LayerCast on the CPU C kernel: the bf16 weight is kept only as the kernel's (K, 64) panels (the
    same bytes), widened to fp32 in registers, and every output is one fmaf chain over k. No per-call
    fp32 copy of the weight (2-3x faster for decode), and each row's bits are independent of the
    batch and the thread count, so `batch_invariant` needs no padding around it."""

    batch_invariant_kernel = True  # padded.make_invariant leaves it as it is

    def __init__(self, linear: LayerCastLinear):
        super().__init__()
        packed = bi.pack_weight(linear.weight)
        self.register_buffer("panels", packed.data)  # (ceil(N / 64), K, 64) bf16
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The (N, K) bf16 weight, unpacked (a copy, for introspection only)."""
        return self.panels.permute(0, 2, 1).reshape(-1, self.in_features)[: self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = bi._kernel_linear(x2, bi.PackedWeight(self.panels, self.out_features, self.in_features), self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=bf16 panels, compute=float32"


@dataclass(frozen=True)
class LayerCastMode(NumericsMode):
    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        return LayerCastLinear(linear, torch.bfloat16)

    def apply(self, model: nn.Module) -> nn.Module:
        """As every mode, then on CPU with the C kernel available, untied linears move to the kernel
        (a linear tied to the embedding keeps the shared table and the per-call upcast)."""
        model = super().apply(model)
        if os.environ.get("DITTO_LAYERCAST_UPCAST") or not bi.kernel_available():
            return model
        shared = {id(m.weight) for m in model.modules() if "Embedding" in type(m).__name__}
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if (
                    isinstance(child, LayerCastLinear)
                    and id(child.weight) not in shared
                    and child.weight.device.type == "cpu"
                    and child.weight.dtype == torch.bfloat16
                ):
                    setattr(parent, name, PackedLayerCastLinear(child))
        return model


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
