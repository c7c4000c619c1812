"""Numerics modes: chosen by name, applied to a loaded model by swapping layers after construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prepared:
    model: torch.nn.Module
    act_dtype: torch.dtype
    kv_dtype: torch.dtype
    mode: object


_KV = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def prepare(loaded, config) -> Prepared:
    """Apply `config.numerics` (and the determinism level's kernels) to a loaded model."""
    try:
        from ditto.numerics.base import get_mode
    except ImportError:  # registry not built yet: plain fp32 only
        if config.numerics != "fp32":
            raise ValueError(f"unknown numerics {config.numerics!r}") from None
        return Prepared(loaded.model, torch.float32, _KV.get(config.kv_dtype or "fp32", torch.float32), None)
    mode = get_mode(config.numerics)
    model = mode.apply(loaded.model)
    if config.determinism == "batch_invariant":
        from ditto.numerics.kernels.padded import make_invariant

        model = make_invariant(model, mode.act_dtype)
    kv_name = config.kv_dtype or mode.kv_dtype
    if kv_name == "int8":
        kv = torch.int8
    elif kv_name in _KV:
        kv = _KV[kv_name]
    else:
        raise ValueError(f"unknown KV-cache dtype {kv_name!r}; choose fp32, bf16, fp16 or int8")
    return Prepared(model, mode.act_dtype, kv, mode)
