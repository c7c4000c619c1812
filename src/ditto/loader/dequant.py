"""GGUF tensors -> float32 torch tensors in (rows, cols) order, and Q4 blocks as they are stored.

F32 tensors are the file's own pages (a view of the copy-on-write map, no copy). Q8_0 and the
4/5-bit formats (Q4_0, Q4_1, Q5_0, Q5_1) are decoded by the gguf kernel library's C decoder (the
default fp32 load of the bundled Q4_1 file: 0.17 s instead of numpy's 0.4-0.6 s), or, without that
library or with $DITTO_DEQUANT_NUMPY set, with a few whole-tensor numpy ops into one preallocated
array (numpy, not torch: torch's elementwise ops fan out to threads, which on a busy machine cost
more than they save). F16/BF16 are numpy casts; the K-quants go through the `gguf` package's block
decoders, a chunk of blocks at a time on plain arrays. Every path computes what
`gguf.quants.dequantize` does, op for op, so the values are bit-identical to it
(tests/test_gguf_file.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ditto.loader.gguf_file import GGML_TYPES, GGUFError, GGUFTensor

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
Q4_BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block
NUMPY_ENV = "DITTO_DEQUANT_NUMPY"  # set: decode with numpy only (tests compare the two paths)
_CHUNK_VALUES = 1 << 20  # values decoded per call of a gguf block decoder (bounds the temporaries)
_TYPE_IDS = {name: kind for kind, (name, _, _) in GGML_TYPES.items()}
# 4/5-bit formats: (bytes of fp16 before the bits: d [, m], offset subtracted from q: 0 when a min m is added)
_NIBBLE_FORMATS = {"Q4_0": (2, 8), "Q4_1": (4, 0), "Q5_0": (2, 16), "Q5_1": (4, 0)}


def dequantize(tensor: GGUFTensor) -> torch.Tensor:
    """One tensor as float32, shape (rows, cols); F32 tensors are views of the file's map."""
    return torch.from_numpy(dequantize_array(tensor))


def dequantize_array(tensor: GGUFTensor) -> np.ndarray:
    """`dequantize` as a numpy array."""
    kind = tensor.type_name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {tensor.name} has unsupported type {kind}; supported: {sorted(SUPPORTED_TYPES)}")
    raw = tensor.data  # uint8 (n_bytes,), a view of the map
    fast = _c_decoded(raw, kind)
    if fast is not None:
        return fast.reshape(tensor.rows_cols)
    if kind == "F32":
        out = raw.view(np.float32)
    elif kind == "F16":
        out = raw.view(np.float16).astype(np.float32)
    elif kind == "BF16":
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif kind == "Q8_0":
        out = np.empty((tensor.n_bytes // 34, Q4_BLOCK), dtype=np.float32)  # 34-byte blocks: fp16 d, 32 int8
        out[:] = raw.reshape(-1, 34)[:, 2:].view(np.int8)
        out *= _halves(raw, 17, 0)  # gguf: x * d
    elif kind in _NIBBLE_FORMATS:
        _, offset = _NIBBLE_FORMATS[kind]
        per_block = GGML_TYPES[_TYPE_IDS[kind]][2] // 2  # fp16s per block
        out = _nibble_values(tensor)
        if offset:
            out -= offset
            out *= _halves(raw, per_block, 0)  # gguf: d * (q - offset)
        else:
            out *= _halves(raw, per_block, 0)  # gguf: (d * q) + m
            out += _halves(raw, per_block, 1)
    else:
        out = _gguf_blocks(tensor)
    return out.reshape(tensor.rows_cols)


def _c_decoded(raw: np.ndarray, kind: str) -> np.ndarray | None:
    """The 32-value block formats through the gguf kernel library's decoder (same bits, ~10x the
    numpy path's speed: the default fp32 load of a Q4_1 file is mostly this); None without it."""
    from ditto.numerics.kernels import gguf_blocks

    if kind not in gguf_blocks.DEQUANT_KINDS or os.environ.get(NUMPY_ENV):
        return None
    return gguf_blocks.dequantize(raw, kind)


def _halves(raw: np.ndarray, per_block: int, index: int) -> np.ndarray:
    """The fp16 at position `index` of every block of `per_block` fp16s, as float32 (blocks, 1)."""
    return raw.view(np.float16).reshape(-1, per_block)[:, index : index + 1].astype(np.float32)


def _nibble_values(tensor: GGUFTensor) -> np.ndarray:
    """A Q4_0/Q4_1/Q5_0/Q5_1 tensor's unsigned numbers as float32 (blocks, 32), in [0, 15] or [0, 31].

    Block layout (ggml): fp16 d, [fp16 m for Q4_1/Q5_1], [u32 of fifth bits for Q5_*: bit j belongs
    to value j], 16 bytes of nibbles: byte j holds value j in its low nibble, value j + 16 in its high.
    """
    head, _ = _NIBBLE_FORMATS[tensor.type_name]
    size = GGML_TYPES[_TYPE_IDS[tensor.type_name]][2]
    blocks = tensor.data.reshape(-1, size)  # (blocks, bytes per block)
    nib = blocks[:, size - Q4_BLOCK // 2 :]  # (blocks, 16)
    out = np.empty((blocks.shape[0], 2, Q4_BLOCK // 2), dtype=np.float32)
    if size - Q4_BLOCK // 2 == head:  # Q4_*
        out[:, 0] = nib & 15
        out[:, 1] = nib >> 4
    else:  # Q5_*: (blocks, 4) bytes -> (blocks, 32) bits, little-endian like the u32 -> (blocks, 2, 16)
        q = np.unpackbits(blocks[:, head : head + 4], axis=1, bitorder="little").reshape(-1, 2, Q4_BLOCK // 2) << 4
        q[:, 0] |= nib & 15
        q[:, 1] |= nib >> 4
        out[:] = q
    return out.reshape(-1, Q4_BLOCK)


def _gguf_blocks(tensor: GGUFTensor) -> np.ndarray:
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
    return out


def q4_blocks(tensor: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 or Q4_1 tensor's own numbers, without dequantising: ``(q uint8 (N, K) in [0, 15],
    d float32 (N, K/32), m float32 (N, K/32))`` with ``w = q * d + m`` exactly (Q4_0: ``m = -8 d``)."""
    if tensor.type_name not in ("Q4_0", "Q4_1"):
        raise GGUFError(f"tensor {tensor.name} is {tensor.type_name}, not Q4_0/Q4_1")
    n, k = tensor.rows_cols
    per_block = 9 if tensor.type_name == "Q4_0" else 10  # fp16s per block
    q = _nibble_values(tensor).astype(np.uint8)
    d = _halves(tensor.data, per_block, 0)
    m = -8 * d if per_block == 9 else _halves(tensor.data, per_block, 1)
    return (torch.from_numpy(q.reshape(n, k)), torch.from_numpy(d.reshape(n, -1)), torch.from_numpy(m.reshape(n, -1)))
