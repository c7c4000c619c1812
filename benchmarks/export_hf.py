"""Export a GGUF model to an HF folder (config.json + model.safetensors + tokenizer) for peers that
load only HF folders (vLLM's CPU build).

    .venv/bin/python benchmarks/export_hf.py [--model smollm2-135m-instruct] [--out DIR]

The weights are those ditto itself runs: loaded with ditto's loader (`ditto.loader.load.load`), so
dequantised to fp32, with llama Q/K rows already un-permuted from llama.cpp's interleaved layout to
HF's rotate-half one (`loader/gguf.py`), and written as fp32 safetensors under HF's names. The
tokenizer is ditto's (`tokenizers` object -> tokenizer.json) with tokenizer_config.json carrying the
special tokens and the chat template. Nothing is downloaded.

The folder goes to ``<ditto cache>/hf-export/<digest>/`` (the GGUF file's sha256 plus this
exporter's format version) and is reused when it is already there; the path is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FORMAT = 1  # bump when the exported files change, so cached exports are redone
DONE = ".export-complete"

# ditto's per-block module names -> HF's (llama / qwen2 / qwen3 decoder layers)
_BLOCK = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_norm": "input_layernorm",
    "pre_ffn_norm": "post_attention_layernorm",  # llama/qwen: the norm before the MLP
}
_ARCH = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


def hf_name(name: str) -> str:
    """ditto parameter name -> HF state-dict name."""
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if name in top:
        return top[name]
    if name == "lm_head.weight":
        return name
    parts = name.split(".")
    if parts[0] != "layers":
        raise ValueError(f"no HF name for {name!r}")
    inner, kind = ".".join(parts[2:-1]), parts[-1]
    if inner not in _BLOCK:
        raise ValueError(f"no HF name for {name!r}")
    return f"model.layers.{parts[1]}.{_BLOCK[inner]}.{kind}"


def hf_config(cfg) -> dict:
    """config.json for a ditto ModelConfig (llama / qwen2 / qwen3 families)."""
    if cfg.family not in _ARCH or cfg.sandwich_norm or cfg.embed_scale != 1.0:
        raise ValueError(f"export to HF supports the {', '.join(_ARCH)} families, not {cfg.family!r}")
    model_type, arch = _ARCH[cfg.family]
    eos = list(cfg.eos_token_ids)
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.activation,
        "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling(cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if model_type == "llama":
        out["mlp_bias"] = False
        out["pretraining_tp"] = 1
    if model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_dim**-0.5) > 1e-12:
        raise ValueError("a custom attention scale has no HF config field for this family")
    return out


def _rope_scaling(scaling: dict | None) -> dict | None:
    if not scaling:
        return None
    out = {k: v for k, v in scaling.items() if k != "type"}
    out["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return out


def tokenizer_files(tok, max_len: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json for a ditto Tokenizer."""
    backend = json.loads(tok.backend.to_str())
    specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, **tok.template_vars}
    specials = {k: v for k, v in specials.items() if v is not None}
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in backend["added_tokens"]
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        **specials,
        "add_bos_token": bool(tok.add_bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    return {
        "tokenizer.json": json.dumps(backend, ensure_ascii=False, indent=1),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
        "special_tokens_map.json": json.dumps(specials, ensure_ascii=False, indent=2),
    }


def write_hf(loaded, out: Path) -> Path:
    """Write `loaded` (a ditto LoadedModel) as an HF folder at `out` (created; must not exist)."""
    import torch
    from safetensors.torch import save_file

    cfg = loaded.config
    config = hf_config(cfg)
    state = {}
    for name, p in loaded.model.named_parameters():  # tied lm_head appears once, as embed.weight
        state[hf_name(name)] = p.detach().to(torch.float32).contiguous().clone()
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = loaded.model.lm_head.weight.detach().float().contiguous().clone()
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": str(loaded.path)})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": config["eos_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    for fname, text in tokenizer_files(loaded.tokenizer, cfg.max_position).items():
        (out / fname).write_text(text, encoding="utf-8")
    return out


def export(model: str = "smollm2-135m-instruct", root: str | os.PathLike | None = None) -> Path:
    """The HF folder for `model` (bundled name or .gguf path), exported once into `root`
    (default: <ditto cache>/hf-export) and reused afterwards."""
    from ditto.loader.digest import file_digest
    from ditto.loader.registry import cache_dir, resolve_model

    path = resolve_model(model)
    if path.is_dir():
        return path  # already an HF folder
    root = Path(root) if root is not None else cache_dir() / "hf-export"
    target = root / f"{file_digest(path)[:16]}-v{FORMAT}"
    if (target / DONE).exists():
        return target
    from ditto.loader.load import load

    loaded = load(path, progress=False)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write_hf(loaded, tmp / "m")
        (tmp / "m" / DONE).write_text(json.dumps({"source": str(path), "format": FORMAT}))
        if target.exists():  # an interrupted earlier export
            shutil.rmtree(target)
        (tmp / "m").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled name or a .gguf file")
    ap.add_argument("--out", default=None, help="parent folder of the export (default: <ditto cache>/hf-export)")
    args = ap.parse_args()
    print(export(args.model, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
