"""KV-cache precision, a knob separate from the numerics mode (EngineConfig.kv_dtype; None
follows the mode's default `NumericsMode.kv_dtype`).

"fp32" / "bf16" / "fp16": K and V rows are stored cast to that dtype.
"int8": each (token, head) row of D values is quantised symmetrically with its own fp32 scale
(``scale = max|row| / 127``, q in [-127, 127]); error per element <= scale/2 (+ one fp32
rounding of x/scale), see quant.quantize_int8_symmetric. Scales cost 4 bytes per token per
head (D=64: 1.0625 bytes per element instead of 4 for fp32).
"""

from __future__ import annotations

import torch

from ditto.numerics.quant import dequantize_int8, quantize_int8_symmetric

KV_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.int8,
}


def resolve_kv_dtype(kv_dtype: str | None, mode_name: str) -> str:
    """The KV precision name to use: `kv_dtype` if given, else the mode's default."""
    from ditto.numerics.base import get_mode

    name = kv_dtype if kv_dtype is not None else get_mode(mode_name).kv_dtype
    if name not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {name!r}; available: {', '.join(KV_DTYPES)}")
    return name


def kv_storage_dtype(kv_dtype: str) -> torch.dtype:
    """torch dtype of the cache tensor for `kv_dtype` (int8 caches also need kv_scale_shape)."""
    return KV_DTYPES[kv_dtype]


def kv_bytes_per_token(kv_dtype: str, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token costs in one layer for K and V together (scales included for int8)."""
    elem = torch.empty(0, dtype=KV_DTYPES[kv_dtype]).element_size()
    per_row = head_dim * elem + (4 if kv_dtype == "int8" else 0)
    return 2 * num_kv_heads * per_row


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H, D) float -> (q int8 (T, H, D), scale fp32 (T, H, 1)), one scale per token per head.
    |x - q*scale| <= scale/2 (+ 127 * 2**-24 * scale)."""
    return quantize_int8_symmetric(x, dim=-1)


def dequantize_kv_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_kv_int8, computed in fp32 and cast to `dtype`."""
    return dequantize_int8(q, scale).to(dtype)


def store_kv(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convert K or V rows (T, H, D) to cache storage: (data, scale or None)."""
    if kv_dtype == "int8":
        return quantize_kv_int8(x)
    return x.to(KV_DTYPES[kv_dtype]), None


def load_kv(data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache storage -> K or V rows in the compute dtype `dtype`."""
    if scale is not None:
        return dequantize_kv_int8(data, scale, dtype)
    return data.to(dtype)
