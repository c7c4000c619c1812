"""benchmarks/export_hf.py: the bundled GGUF written as an HF folder (what vLLM's CPU build loads) holds
exactly ditto's fp32 weights, and transformers run on it gives ditto's greedy tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.loader.load import load
from ditto.loader.safetensors_dir import config_from_hf
from ditto.loader.tokenizer import Tokenizer

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is 17 * 23?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]
NEW_TOKENS = 16


def _exporter():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "export_hf.py"
    spec = importlib.util.spec_from_file_location("export_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    try:
        from ditto.loader.registry import resolve_model

        resolve_model(MODEL)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("hf-export")
    out = _exporter().export(MODEL, root)
    assert _exporter().export(MODEL, root) == out  # reused, not redone
    return out


@pytest.fixture(scope="module")
def llm():
    """ditto fp32 on one thread (a shared 2-core machine: two spinning OpenMP threads stall when one core
    is busy elsewhere); transformers runs on the same single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM(MODEL, numerics="fp32", progress=False, enable_prefix_caching=False, threads=1)
    torch.set_num_threads(threads)


def test_weights_and_tokenizer_are_dittos(exported):
    from safetensors import safe_open

    names = _exporter().hf_name
    gguf = load(MODEL, progress=False)
    params = dict(gguf.model.named_parameters())
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == {names(n) for n in params}
        for name, p in params.items():
            t = f.get_tensor(names(name))
            assert t.dtype == torch.float32 and torch.equal(t, p.detach()), name
    # ditto reads the folder back as the same model config and the same tokenizer
    assert config_from_hf(exported) == gguf.config
    tok = Tokenizer.from_hf_dir(exported)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.add_bos) == (
        gguf.tokenizer.bos_id,
        gguf.tokenizer.eos_id,
        gguf.tokenizer.stop_ids,
        gguf.tokenizer.add_bos,
    )
    assert tok.chat_template == gguf.tokenizer.chat_template
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        assert tok.encode_chat(msgs) == gguf.tokenizer.encode_chat(msgs)
        assert tok.encode(q) == gguf.tokenizer.encode(q)


def test_transformers_greedy_matches_ditto(exported, llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    stop = sorted(llm.engine.stop_ids)
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        ids = llm.encode(llm.chat_prompt(msgs), add_special_tokens=False)
        theirs = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert tok(theirs, add_special_tokens=False)["input_ids"] == ids
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                suppress_tokens=stop,
                eos_token_id=None,
            )[0, len(ids) :].tolist()
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
        ours = llm.generate([ids], params)[0].outputs[0].token_ids
        assert list(ours) == ref, q
