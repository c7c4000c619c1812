"""Tiny random-weight models of every supported family, built with HF transformers and saved as
safetensors + tokenizer.json, so tests exercise the real loading path in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on a small corpus, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "What is 12 plus 30? The answer is 42. Let's think step by step.",
        "def add(a, b):\n    return a + b\n",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>", unk_token=None
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(path)


def make_tiny_model(path: Path, family: str, seed: int = 0, vocab_size: int = 384) -> Path:
    """Build, randomly initialise and save a tiny model of `family` in `path`; returns `path`."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=0,
        tie_word_embeddings=family != "llama",
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=10000.0)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1000000.0)
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)
        model = tf.Qwen3ForCausalLM(cfg)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 6},
            head_dim=32,
            sliding_window=8,
            query_pre_attn_scalar=32,
            hidden_activation="gelu_pytorch_tanh",
        )
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # HF zero-inits some norms; randomise so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if family == "gemma3" else 1.0))
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(path, vocab_size)
    meta = json.loads((path / "config.json").read_text())
    assert meta["vocab_size"] == vocab_size
    return path
