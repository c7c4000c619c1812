"""Batch-invariant row-wise layers for GPUs: every call on tiles of exactly TILE rows.

A GPU GEMM or reduction picks its kernel (tile shape, split-K, threads per row) from the whole
problem shape, so a row's bits can change with the number of rows computed beside it. Running a
row-wise op (projection, LM head, RMSNorm) on tiles of exactly TILE rows — the last one padded
with zeros — gives every call one shape, hence one kernel and one reduction order for every row
wherever it sits in the batch. Elementwise ops (activations, RoPE, residual adds) need nothing.

Each wrapped op's promise is checked once per (type, width, dtype, device) on the device itself:
rows computed alone and at several positions inside batches of several sizes must agree bit for
bit. A failed check is an error naming the layer, never a silent downgrade.

The same code runs on CPU (DITTO_TILED_INVARIANT=1 forces it there), which is how the suite tests
its logic on machines without a GPU; on CPU the default is `padded.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from ditto.models.layers import RMSNorm
from ditto.numerics.kernels.padded import LINEAR_NAMES, RowsWrapper

TILE = 64
_CHECK_SIZES = (1, 3, 64, 65, 130, 300)
_verdicts: dict[tuple, bool] = {}


class FixedTileRows(RowsWrapper):
    """Wraps a module mapping rows (..., K) -> (..., N) and runs it on (TILE, K) tiles only."""

    def __init__(self, inner: nn.Module, tile: int = TILE):
        super().__init__(inner)
        self.tile = tile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        m = x2.shape[0]
        pad = -m % self.tile
        if pad:
            x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
        out = torch.cat([self.inner(t) for t in x2.split(self.tile)])[:m]  # every call (TILE, K)
        return out.reshape(*lead, out.shape[-1])


def _width(module: nn.Module) -> int:
    if isinstance(module, RMSNorm):
        return module.weight.shape[0]
    w = getattr(module, "weight", None)
    if w is not None and w.dim() == 2 and w.is_floating_point():
        return w.shape[1]
    return int(module.in_features)


def tiles_are_invariant(module: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Do three rows through FixedTileRows(module) agree bitwise alone and inside other batches?"""
    k = _width(module)
    key = (type(module).__name__, k, getattr(module, "out_features", None), dtype, str(device))
    if key in _verdicts:
        return _verdicts[key]
    wrapped = FixedTileRows(module)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max(_CHECK_SIZES) + 8, k, generator=gen).to(device=device, dtype=dtype)
    with torch.inference_mode():
        ref = wrapped(x[:3])
        ok = True
        for m in _CHECK_SIZES:
            for offset in (o for o in (0, 5, 62) if o <= m):
                rows = torch.cat([x[3 : 3 + offset], x[:3], x[3 + offset : 3 + m]])  # the 3 rows at `offset`
                out = wrapped(rows)
                ok &= torch.equal(out[offset : offset + 3], ref)
    _verdicts[key] = bool(ok)
    return _verdicts[key]


def make_invariant_tiled(model: nn.Module, act_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap every projection, the LM head and every RMSNorm in FixedTileRows (checked on its device)."""
    device = next(model.parameters()).device
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and (name.split(".")[-1] in LINEAR_NAMES or isinstance(mod, RMSNorm))
    ]
    for name, mod in targets:
        if type(mod).__name__ == "LLMInt8Linear":
            raise ValueError(
                "numerics int8 (LLM.int8) picks its outlier columns from the whole batch, so it cannot be "
                "batch-invariant; use w8a8 (per-token int8) or a float mode with --determinism batch_invariant"
            )
        if not tiles_are_invariant(mod, act_dtype, device):
            raise ValueError(
                f"{name} ({type(mod).__name__}) gives different bits for the same row in different batches "
                f"even on fixed {TILE}-row tiles on {device}; batch_invariant is not available for this "
                "mode on this device"
            )
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.split(".")[-1], FixedTileRows(mod))
    return model
