"""HF model directories: config.json + (sharded) *.safetensors, renamed to ditto's module names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ditto.config import ModelConfig

MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

_BLOCK = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "input_norm",
    "pre_feedforward_layernorm": "pre_ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm",
}
_RE = re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json; an HF model directory needs config.json + *.safetensors"
        )
    cfg = json.loads(path.read_text())
    return cfg.get("text_config", cfg) if cfg.get("model_type") == "gemma3" else cfg


def config_from_hf(directory: Path) -> ModelConfig:
    hf = read_config(directory)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown architecture model_type={model_type!r}; ditto supports: {', '.join(MODEL_TYPES)}")
    family = MODEL_TYPES[model_type]
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    rope_params = hf.get("rope_parameters") or {}
    rope_scaling = hf.get("rope_scaling") or None
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        rope_scaling["type"] = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rope_scaling["type"] == "default":
            rope_scaling = None
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    common = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hidden // heads,
        max_position=hf.get("max_position_embeddings", 2048),
        rms_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma3")),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
    )
    if family == "llama":
        common["qkv_bias"] = bool(hf.get("attention_bias", False))
    if family == "qwen2":
        common["qkv_bias"] = True
    if family == "qwen3":
        common["qk_norm"] = True
        common["qkv_bias"] = bool(hf.get("attention_bias", False))
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ValueError("Qwen sliding-window attention (use_sliding_window=true) is not supported")
    if family == "gemma3":
        n = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
            for i in range(n)
        ]
        local = hf.get("rope_local_base_freq")
        if local is None:
            local = (rope_params.get("sliding_attention") or {}).get("rope_theta", 10000.0)
            full = rope_params.get("full_attention") or {}
            theta = full.get("rope_theta", theta)
            if full.get("rope_type", "default") != "default":
                common["rope_scaling"] = {**full, "type": full["rope_type"]}
        common.update(
            rope_theta=float(theta),
            qk_norm=True,
            sandwich_norm=True,
            norm_offset=1.0,
            embed_scale=hidden**0.5,
            activation="gelu_tanh",
            attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
            sliding_window=hf.get("sliding_window", 512),
            layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in layer_types),
            rope_local_theta=float(local),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
    return ModelConfig(**common)


def hf_to_ditto_name(name: str, family: str) -> str | None:
    if name in ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight"):
        return "embed.weight"
    if name in ("model.norm.weight", "norm.weight", "model.language_model.norm.weight"):
        return "norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    m = _RE.match(name)
    if not m:
        return None
    layer, inner, kind = m.groups()
    if inner == "post_attention_layernorm":
        # Llama/Qwen: the norm before the MLP; Gemma: the norm after attention (sandwich).
        target = "post_attn_norm" if family == "gemma3" else "pre_ffn_norm"
    else:
        target = _BLOCK.get(inner)
    return None if target is None else f"layers.{layer}.{target}.{kind}"


def weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors files")
    return files


def iter_hf_weights(directory: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor, str]]:
    from safetensors import safe_open

    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                name = hf_to_ditto_name(key, cfg.family)
                if name is None:
                    if "rotary_emb" in key:
                        continue
                    raise ValueError(f"unexpected weight {key!r} in {file.name} for a {cfg.family} model")
                t = f.get_tensor(key)
                yield name, t, str(t.dtype).removeprefix("torch.")
