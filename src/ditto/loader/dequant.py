"""GGUF tensors -> float32 torch tensors in (rows, cols) order, and Q4 blocks as they are stored.

F32 tensors are the file's own pages (a view of the copy-on-write map, no copy). F16/BF16 and the
block formats ditto's bundled models use (Q4_0, Q4_1, Q8_0) are decoded with whole-tensor torch
ops; the other block formats (Q5_*, K-quants) go through the `gguf` package's block decoders, a
chunk of blocks at a time on plain arrays. Every path computes what `gguf.quants.dequantize` does,
op for op, so the values are bit-identical to it (tests/test_gguf_file.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ditto.loader.gguf_file import GGML_TYPES, GGUFError, GGUFTensor

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
Q4_BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block
_CHUNK_VALUES = 1 << 20  # values decoded per call of a gguf block decoder (bounds the temporaries)
_TYPE_IDS = {name: kind for kind, (name, _, _) in GGML_TYPES.items()}


def dequantize(tensor: GGUFTensor) -> torch.Tensor:
    """One tensor as float32, shape (rows, cols); F32 tensors are views of the file's map."""
    kind = tensor.type_name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {tensor.name} has unsupported type {kind}; supported: {sorted(SUPPORTED_TYPES)}")
    shape = tensor.rows_cols
    if tensor.n_bytes == 0:
        return torch.empty(shape, dtype=torch.float32)
    raw = torch.frombuffer(tensor.data, dtype=torch.uint8)  # (n_bytes,), shares the map
    if kind == "F32":
        return raw.view(torch.float32).view(shape)
    if kind in ("F16", "BF16"):
        return raw.view(torch.float16 if kind == "F16" else torch.bfloat16).float().view(shape)
    if kind == "Q8_0":
        blocks = raw.view(-1, 2 + Q4_BLOCK)  # (blocks, 34): fp16 d, 32 int8
        d = _f16(blocks[:, 0:2])
        x = blocks[:, 2:].contiguous().view(torch.int8).float()
        return x.mul_(d).view(shape)  # gguf: x * d
    if kind in ("Q4_0", "Q4_1"):
        q, d, m = _q4_parts(tensor, raw)
        if kind == "Q4_0":
            return q.sub_(8).mul_(d).view(shape)  # gguf: d * (q - 8)
        return q.mul_(d).add_(m).view(shape)  # gguf: (d * q) + m
    return _gguf_blocks(tensor)


def _f16(two_bytes: torch.Tensor) -> torch.Tensor:
    """(blocks, 2) uint8 holding one fp16 each -> (blocks, 1) float32."""
    return two_bytes.contiguous().view(torch.float16).float()


def _q4_parts(tensor: GGUFTensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A Q4_0/Q4_1 tensor's blocks: (q float32 (blocks, 32) in [0, 15], d (blocks, 1), m (blocks, 1) or None).

    Block layout (ggml): fp16 d, [fp16 m for Q4_1], 16 bytes of nibbles; byte j holds value j in its
    low nibble and value j + 16 in its high nibble.
    """
    head = 2 if tensor.type_name == "Q4_0" else 4
    blocks = raw.view(-1, head + Q4_BLOCK // 2)  # (blocks, 18 | 20)
    nib = blocks[:, head:]
    q = torch.cat([nib & 0xF, nib >> 4], dim=1).float()  # (blocks, 16) x2 -> (blocks, 32)
    m = _f16(blocks[:, 2:4]) if head == 4 else None
    return q, _f16(blocks[:, 0:2]), m


def _gguf_blocks(tensor: GGUFTensor) -> torch.Tensor:
    """Formats ditto does not decode itself: the gguf package's block decoder over chunks of blocks."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import _type_traits

    _, block, block_bytes = GGML_TYPES[_TYPE_IDS[tensor.type_name]]
    quant = _type_traits[GGMLQuantizationType(_TYPE_IDS[tensor.type_name])]
    quant.init_grid()
    blocks = tensor.data.reshape(-1, block_bytes)  # (blocks, bytes per block)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // block)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = quant.dequantize_blocks(blocks[i : i + step])
    return torch.from_numpy(out).view(tensor.rows_cols)


def q4_blocks(tensor: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 or Q4_1 tensor's own numbers, without dequantising: ``(q uint8 (N, K) in [0, 15],
    d float32 (N, K/32), m float32 (N, K/32))`` with ``w = q * d + m`` exactly (Q4_0: ``m = -8 d``)."""
    if tensor.type_name not in ("Q4_0", "Q4_1"):
        raise GGUFError(f"tensor {tensor.name} is {tensor.type_name}, not Q4_0/Q4_1")
    n, k = tensor.rows_cols
    q, d, m = _q4_parts(tensor, torch.frombuffer(tensor.data, dtype=torch.uint8))
    m = -8 * d if m is None else m
    return q.to(torch.uint8).view(n, k), d.view(n, k // Q4_BLOCK), m.view(n, k // Q4_BLOCK)
