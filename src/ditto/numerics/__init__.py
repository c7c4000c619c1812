"""Numerics modes: chosen by name, applied to a loaded model by swapping layers after construction.

`prepare()` returns a `Prepared` bundle: the converted model plus the three things the engine asks
the mode for — how to build the KV cache, how to build the per-step attention context, and how
to sample a token — so that the engine never branches on the mode either.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ditto.sampling import sample_row

_KV = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "int8": torch.int8,
}


def _float_cache(cfg, num_blocks: int, block_size: int, kv_dtype):
    from ditto.engine.attention import KVCache

    return KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype)


def _float_context(cache, slots, decode, prefills, cfg):
    from ditto.engine.attention import PagedAttention

    return PagedAttention(cache, slots, decode, prefills, cfg.scale, cfg.num_heads)


@dataclass
class Prepared:
    model: torch.nn.Module
    act_dtype: torch.dtype
    kv_dtype: torch.dtype
    mode: object
    make_cache: Callable = None  # (cfg, num_blocks, block_size) -> cache with copy_blocks()
    make_context: Callable = None  # (cache, slots, decode, prefills, cfg) -> AttentionContext
    kv_bytes_per_token: Callable = None  # (cfg) -> bytes
    sample: Callable = sample_row  # (logits_row, params, prompt_ids, output_ids, sample_index, token_index) -> id
    digest_extra: bytes = b""  # e.g. calibration data that is part of the model's identity
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ditto.engine.attention import KVCache

        kv = self.kv_dtype
        if self.make_cache is None:
            self.make_cache = lambda cfg, n, bs: _float_cache(cfg, n, bs, kv)
        if self.make_context is None:
            self.make_context = _float_context
        if self.kv_bytes_per_token is None:
            self.kv_bytes_per_token = lambda cfg: KVCache.bytes_per_token(
                cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv
            )


def prepare(loaded, config) -> Prepared:
    """Apply `config.numerics` (and the determinism level's kernels) to a loaded model on `config.device`."""
    if config.determinism == "exact" and config.numerics != "integer":
        raise ValueError("determinism 'exact' needs numerics 'integer' (integer-only arithmetic end to end)")
    device = torch.device(config.device)
    if config.numerics == "integer":
        if device.type != "cpu":
            raise ValueError("numerics 'integer' (determinism 'exact') runs on CPU only: its fused kernels are C")
        from ditto.numerics.integer_engine import prepare_integer

        return prepare_integer(loaded, config)
    from ditto.numerics.base import get_mode

    mode = get_mode(config.numerics)
    model = mode.apply(loaded.model.to(device))  # converted where it runs (CPU-only kernels stay off GPUs)
    context = None
    if config.determinism == "batch_invariant":
        if device.type == "cpu" and not os.environ.get("DITTO_TILED_INVARIANT"):
            from ditto.numerics.kernels.padded import make_invariant

            model = make_invariant(model, mode.act_dtype)
        else:
            from ditto.engine.attention_tiled import tiled_context
            from ditto.numerics.kernels.tiled import make_invariant_tiled

            model = make_invariant_tiled(model, mode.act_dtype)
            context = tiled_context
    kv_name = config.kv_dtype or mode.kv_dtype
    if kv_name not in _KV:
        raise ValueError(f"unknown KV-cache dtype {kv_name!r}; choose fp32, bf16, fp16 or int8")
    return Prepared(model, mode.act_dtype, _KV[kv_name], mode, make_context=context)
