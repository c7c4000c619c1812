"""Numerics modes: chosen by name, applied to a loaded model by swapping layers after construction.

`prepare()` returns a `Prepared` bundle: the converted model plus the three things the engine asks
the mode for — how to build the KV cache, how to build the per-step attention context, and how
to sample a token — so that the engine never branches on the mode either. The registered mode
builds it (`NumericsMode.prepare`): module-swap modes through `prepare_float`, the `integer` mode
(integer_engine.py) by calibrating first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ditto.config import KV_DTYPES
from ditto.sampling import sample_row


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
    make_cache: Callable = None  # (cfg, num_blocks, block_size) -> cache with clear_blocks(), copy_blocks()
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
    """Apply `config.numerics` (a registered mode, see base.get_mode) to a loaded model on `config.device`.

    `config` is an EngineConfig, so its numerics and determinism already agree (config.check_numerics).
    """
    from ditto.numerics.base import get_mode

    return get_mode(config.numerics).prepare(loaded, config)


def prepare_float(mode, loaded, config) -> Prepared:
    """The bundle of a module-swap mode: `mode.apply` on the model where it runs, the determinism
    level's kernels, a KV cache in config.kv_dtype (default: the mode's)."""
    device = torch.device(config.device)
    model = mode.apply(loaded.model.to(device))  # converted where it runs (CPU-only kernels stay off GPUs)
    context = None
    if config.determinism == "batch_invariant" and not mode.can_be_batch_invariant:
        raise ValueError(
            f"numerics {mode.name} ({mode.description}) cannot be batch-invariant: its rows depend on the rest "
            "of the batch by design; use w8a8 (per-token int8) or a float mode with --determinism batch_invariant"
        )
    if config.determinism == "batch_invariant":
        if device.type == "cpu" and not os.environ.get("DITTO_TILED_INVARIANT"):
            from ditto.numerics.kernels.padded import make_invariant

            model = make_invariant(model, mode.act_dtype)
        else:
            from ditto.engine.attention_tiled import tiled_context
            from ditto.numerics.kernels.tiled import make_invariant_tiled

            model = make_invariant_tiled(model, mode.act_dtype)
            context = tiled_context
    kv_dtype = getattr(torch, KV_DTYPES[config.kv_dtype or mode.kv_dtype])
    return Prepared(model, mode.act_dtype, kv_dtype, mode, make_context=context)
