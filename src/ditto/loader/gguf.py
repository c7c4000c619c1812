"""GGUF files: metadata -> ModelConfig, tensors dequantised and renamed to ditto's module names."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ditto.config import ModelConfig

# GGML tensor types we dequantise (the gguf package implements the block formats).
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
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


class GGUFError(ValueError):
    """A GGUF file that ditto cannot load, with the reason."""


def open_reader(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises assorted errors on bad bytes
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}") from exc


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_gguf(reader) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in ARCH_TO_FAMILY:
        raise GGUFError(f"unknown architecture {arch!r} in GGUF metadata; ditto supports: {', '.join(ARCH_TO_FAMILY)}")

    def meta(key, default=None):
        return field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = int(meta("attention.key_length", hidden // heads))
    n_layers = int(meta("block_count"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = int(meta("vocab_size", len(tokens) if tokens is not None else 0))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    bos = field(reader, "tokenizer.ggml.bos_token_id")
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
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as a float32 numpy array in torch (rows, cols) order."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {tensor.name} has unsupported type {kind}; supported: {sorted(SUPPORTED_TYPES)}")
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists ne0 (columns) first
    return np.asarray(data, dtype=np.float32).reshape(shape)


# ------------------------------------------------------------------ raw Q4 blocks

Q4_BLOCK = 32  # values per Q4_0 / Q4_1 block


def q4_blocks(tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 or Q4_1 tensor's own numbers, without dequantising: ``(q uint8 (N, K) in [0, 15],
    d float32 (N, K/32), m float32 (N, K/32))`` with ``w = q * d + m`` exactly (Q4_0: ``m = -8 d``).

    Block layout (ggml): fp16 d, [fp16 m for Q4_1], 16 bytes of nibbles; byte j holds value j in its
    low nibble and value j + 16 in its high nibble.
    """
    kind = tensor.tensor_type.name
    if kind not in ("Q4_0", "Q4_1"):
        raise GGUFError(f"tensor {tensor.name} is {kind}, not Q4_0/Q4_1")
    n, k = (int(d) for d in reversed(tensor.shape))
    head = 2 if kind == "Q4_0" else 4
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // Q4_BLOCK, head + 16)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    nib = raw[..., head:]
    q = np.concatenate([nib & 0xF, nib >> 4], axis=-1).reshape(n, k)  # (N, K/32, 32) -> (N, K)
    m = -8 * d if kind == "Q4_0" else raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return torch.from_numpy(q.copy()), torch.from_numpy(d), torch.from_numpy(np.ascontiguousarray(m))


class Q4Source:
    """Where a linear's weight came from when the file stored it as Q4_0/Q4_1: lets a 4-bit numerics
    mode use the file's own 4-bit numbers instead of re-quantising the float copy. Decoded on demand
    (the reader memory-maps the file); deep copies share it."""

    def __init__(self, tensor, row_perm: torch.Tensor | None):
        self.tensor, self.row_perm = tensor, row_perm
        self.kind = tensor.tensor_type.name

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, d, m = q4_blocks(self.tensor)
        if self.row_perm is not None:
            q, d, m = q[self.row_perm], d[self.row_perm], m[self.row_perm]
        return q, d, m

    def __deepcopy__(self, memo):
        return self


def q4_sources(reader, cfg: ModelConfig) -> dict[str, Q4Source]:
    """ditto weight name -> Q4Source for every Q4_0/Q4_1 tensor of the file."""
    out = {}
    for tensor in reader.tensors:
        name = gguf_to_ditto_name(tensor.name)
        if name is None or tensor.tensor_type.name not in ("Q4_0", "Q4_1"):
            continue
        perm = None
        if cfg.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            rows = int(tensor.shape[-1])
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            perm = torch.from_numpy(_unpermute_rope(np.arange(rows, dtype=np.int64), heads).copy())
        out[name] = Q4Source(tensor, perm)
    return out


def iter_gguf_weights(reader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield (ditto name, float32 tensor, ggml type) for every tensor; unknown names raise."""
    for tensor in reader.tensors:
        name = gguf_to_ditto_name(tensor.name)
        if name is None:
            raise GGUFError(f"unexpected tensor {tensor.name!r} for architecture {cfg.family}")
        w = dequantize(tensor)
        if cfg.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute_rope(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        if cfg.family == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma norms as (1 + w)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True)), tensor.tensor_type.name
