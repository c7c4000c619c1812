"""GGUF files: metadata -> ModelConfig, tensors dequantised and renamed to ditto's module names."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ditto.config import ModelConfig
from ditto.loader.dequant import SUPPORTED_TYPES, dequantize_array, q4_blocks
from ditto.loader.gguf_file import GGUFError, GGUFFile, GGUFTensor

__all__ = [
    "SUPPORTED_TYPES",
    "GGUFError",
    "GGUFFile",
    "config_from_gguf",
    "iter_gguf_weights",
    "open_gguf",
    "q4_sources",
]
ARCH_TO_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}

# GGUF tensor name suffix -> ditto module path suffix (per block).
_BLOCK_NAMES = {
    "attn_norm": "input_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "pre_ffn_norm",
    "post_ffw_norm": "post_ffn_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed file (metadata, tensor table; tensor bytes stay in the map until used)."""
    return GGUFFile(path)


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    field = gguf.metadata.get
    arch = field("general.architecture")
    if arch not in ARCH_TO_FAMILY:
        raise GGUFError(f"unknown architecture {arch!r} in GGUF metadata; ditto supports: {', '.join(ARCH_TO_FAMILY)}")

    def meta(key, default=None):
        return field(f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = int(meta("attention.key_length", hidden // heads))
    n_layers = int(meta("block_count"))
    vocab = int(meta("vocab_size", gguf.metadata.array_len("tokenizer.ggml.tokens")))
    has_output = any(t.name == "output.weight" for t in gguf.tensors)
    eos = field("tokenizer.ggml.eos_token_id")
    bos = field("tokenizer.ggml.bos_token_id")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position=int(meta("context_length", 2048)),
        rms_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta),
        tie_embeddings=not has_output,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    family = ARCH_TO_FAMILY[arch]
    if family == "qwen2":
        common["qkv_bias"] = True
    if family == "qwen3":
        common["qk_norm"] = True
    if family == "gemma3":
        window = int(meta("attention.sliding_window", 512))
        # Gemma 3: five sliding-window layers then one global layer, repeating.
        layer_types = tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(n_layers))
        common.update(
            qk_norm=True,
            sandwich_norm=True,
            norm_offset=1.0,
            embed_scale=hidden**0.5,
            activation="gelu_tanh",
            attn_scale=256**-0.5 if head_dim == 256 else head_dim**-0.5,
            sliding_window=window,
            layer_types=layer_types,
            rope_local_theta=10000.0,
        )
    return ModelConfig(family=family, **common)


def _rope_scaling(meta) -> dict | None:
    kind = meta("rope.scaling.type")
    factor = meta("rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    return {"type": str(kind), "factor": float(factor)}


def gguf_to_ditto_name(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows so rotate-half RoPE applies (llama family)."""
    half = w.shape[0] // n_head // 2
    # (out, in) -> (heads, half, 2, in) -> swap -> (heads, 2, half, in) -> (out, in)
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2)).reshape(w.shape)


class BlockSource:
    """Where a weight came from when the file stored it in quantised blocks (Q4_0 ... Q6_K): lets a
    numerics mode run on the file's own numbers instead of the dequantised float copy (the `gguf`
    mode computes on the blocks, the 4-bit modes reuse Q4_0/Q4_1 values). Read on demand from the
    file's map; deep copies share it."""

    def __init__(self, tensor: GGUFTensor, row_perm: torch.Tensor | None):
        self.tensor, self.row_perm = tensor, row_perm
        self.kind = tensor.type_name

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the weight: (out_features, in_features) for a linear."""
        return self.tensor.rows_cols

    def rows(self) -> torch.Tensor:
        """The weight's raw blocks as uint8 (rows, bytes per row): a view of the file's map, or a copy
        in ditto's row order where the llama Q/K rows are permuted."""
        n = self.tensor.rows_cols[0]
        raw = torch.from_numpy(self.tensor.data.reshape(n, -1))
        return raw[self.row_perm].contiguous() if self.row_perm is not None else raw

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_0/Q4_1 only: (q uint8 (N, K), d, m) with w = q * d + m (see dequant.q4_blocks)."""
        q, d, m = q4_blocks(self.tensor)
        if self.row_perm is not None:
            q, d, m = q[self.row_perm], d[self.row_perm], m[self.row_perm]
        return q, d, m

    def __deepcopy__(self, memo):
        return self


Q4Source = BlockSource  # the name the 4-bit modes knew it by

BLOCK_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"})


def _row_perm(name: str, rows: int, cfg: ModelConfig) -> torch.Tensor | None:
    if cfg.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
        return torch.from_numpy(_unpermute_rope(np.arange(rows, dtype=np.int64), heads))
    return None


def block_sources(gguf: GGUFFile, cfg: ModelConfig) -> dict[str, BlockSource]:
    """ditto weight name -> BlockSource for every block-quantised tensor of the file."""
    out = {}
    for tensor in gguf.tensors:
        name = gguf_to_ditto_name(tensor.name)
        if name is None or tensor.type_name not in BLOCK_TYPES:
            continue
        out[name] = BlockSource(tensor, _row_perm(name, tensor.rows_cols[0], cfg))
    return out


def q4_sources(gguf: GGUFFile, cfg: ModelConfig) -> dict[str, BlockSource]:
    """ditto weight name -> BlockSource for every Q4_0/Q4_1 tensor of the file."""
    return {name: src for name, src in block_sources(gguf, cfg).items() if src.kind in ("Q4_0", "Q4_1")}


def iter_gguf_weights(
    gguf: GGUFFile, cfg: ModelConfig, *, keep_blocks: bool = False
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield (ditto name, float32 tensor, ggml type) for every tensor; unknown names raise.

    keep_blocks: block-quantised tensors are not decoded; they come as meta tensors of the right
    shape, for a numerics mode that runs on the blocks themselves (`BlockSource`, numerics `gguf`).

    A tensor the file stores as F32 and ditto uses as is stays a view of the file's map. numpy, not
    torch, does the decoding and the reordering: single-threaded, so a busy machine does not stall it."""
    for tensor in gguf.tensors:
        name = gguf_to_ditto_name(tensor.name)
        if name is None:
            raise GGUFError(f"unexpected tensor {tensor.name!r} for architecture {cfg.family}")
        if keep_blocks and tensor.type_name in BLOCK_TYPES:
            yield name, torch.empty(tensor.rows_cols, device="meta"), tensor.type_name
            continue
        w = dequantize_array(tensor)
        if cfg.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute_rope(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        if cfg.family == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma norms as (1 + w)
        yield name, torch.from_numpy(w), tensor.type_name
