"""Parity with HF transformers in fp32: logits within 1e-4 and identical greedy tokens."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES

from ditto import LLM, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "What is 12 plus 30?",
    "def add(a, b):",
    "Natalia sold clips to 48 of her friends in April",
    "The answer is",
]


def _greedy(llm, hf, ids: list[int]) -> int:
    """64 greedy tokens from both engines with the same stop tokens suppressed (ours: min_tokens masks
    them; HF: suppress_tokens), so neither stops early; returns how many tokens were compared."""
    stop = sorted(llm.engine.stop_ids)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=64, do_sample=False, suppress_tokens=stop, eos_token_id=None
        )[0, len(ids) :]
    ours = llm.generate([ids], SamplingParams(temperature=0, max_tokens=64, min_tokens=64))[0].outputs[0]
    assert ours.token_ids == ref.tolist()
    return len(ours.token_ids)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_parity(tiny_dirs, family):
    path = tiny_dirs[family]
    hf = _hf(path)
    llm = LLM(str(path), determinism="fast", progress=False)  # parity of the model, on MKL GEMMs
    for prompt in PROMPTS:
        ids = llm.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]  # (T, V)
        # our teacher-forced pass over the prompt gives the logits of positions 0..T-2 -> tokens 1..T-1
        ours = llm.score(ids[:1], ids[1:] + [0], keep_logits=True).logits  # (T, V)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4, prompt
    # greedy: 64 new tokens identical to HF generate
    for prompt in PROMPTS[:2]:
        assert _greedy(llm, hf, llm.encode(prompt)) == 64


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_bundled_gguf_parity(name):
    """The real bundled GGUF models against transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    from ditto.loader.registry import resolve_model

    path = resolve_model(name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(name, determinism="fast", progress=False)
    worst = 0.0
    for prompt in PROMPTS:
        ids = llm.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        ours = llm.score(ids[:1], ids[1:] + [0], keep_logits=True).logits
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= 1e-4
    assert _greedy(llm, hf, llm.encode(PROMPTS[1])) == 64
