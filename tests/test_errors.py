"""Bad input gets one clear error and loses nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.config import EngineConfig, resolve_determinism, resolve_numerics
from ditto.engine.llm_engine import PromptTooLong
from ditto.loader.gguf import GGUFError, GGUFFile
from ditto.loader.load import WeightError


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        LLM(str(tmp_path / "nope.gguf"), progress=False)


def test_truncated_and_corrupt_gguf(tmp_path):
    from ditto.loader.registry import resolve_model

    src = resolve_model("smollm2-135m-instruct")
    truncated = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        truncated.write_bytes(f.read(4096))
    with pytest.raises(GGUFError, match="truncated.gguf is not a readable GGUF file"):
        LLM(str(truncated), progress=False)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(GGUFError, match="garbage.gguf is not a GGUF file"):
        LLM(str(garbage), progress=False)
    header = GGUFFile(src).data_offset  # the whole header survives, the tensor data does not
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(header + 1000))
    with pytest.raises(GGUFError, match="cut.gguf is truncated: tensor"):
        LLM(str(cut), progress=False)


def test_unknown_architecture_gguf(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unknown architecture 'mamba'"):
        LLM(str(path), progress=False)


def test_unknown_architecture_hf(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture model_type='gpt_neox'"):
        LLM(str(d), progress=False)


def test_missing_and_misshaped_weights(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(WeightError, match="missing weights: layers.1.mlp.up_proj.weight"):
        LLM(str(d), progress=False)
    weights = load_file(tiny_llama / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][:8]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(WeightError, match="has shape"):
        LLM(str(d), progress=False)
    weights = load_file(tiny_llama / "model.safetensors")
    weights["model.layers.9.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"].clone()
    save_file(weights, d / "model.safetensors")
    with pytest.raises(WeightError, match="unexpected weight"):
        LLM(str(d), progress=False)


def test_prompt_longer_than_context_keeps_engine_usable(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False)
    limit = llm.engine.max_model_len
    with pytest.raises(PromptTooLong, match="context window"):
        llm.generate([[5] * (limit + 10)], SamplingParams(max_tokens=4))
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4  # nothing was lost: the engine still serves
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**9]], SamplingParams(max_tokens=2))
    # generation stops at the context window instead of overflowing it
    near = llm.generate([[5] * (limit - 3)], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert near.outputs[0].finish_reason == "length" and len(near.outputs[0].token_ids) == 3


def test_unknown_numerics_and_determinism(tiny_llama):
    with pytest.raises(ValueError, match="unknown numerics"):
        LLM(str(tiny_llama), numerics="fp8", progress=False)
    with pytest.raises(ValueError, match="unknown determinism"):
        LLM(str(tiny_llama), determinism="sometimes", progress=False)


def test_integer_numerics_and_exact_determinism_go_together(tiny_llama):
    for numerics, determinism in (("fp32", "exact"), ("integer", "fast"), ("integer", "batch_invariant")):
        with pytest.raises(ValueError, match="go together"):
            EngineConfig(numerics=numerics, determinism=determinism)
    with pytest.raises(ValueError, match="go together"):
        LLM(str(tiny_llama), numerics="fp32", determinism="exact", progress=False)
    # the CLI's reading: either side brings the other; comparisons across modes cap float modes at batch_invariant
    assert resolve_numerics("fp32", "exact") == "integer" and resolve_numerics("bf16", "fast") == "bf16"
    assert resolve_determinism("integer", "fast") == "exact"
    assert resolve_determinism("w8a8", "exact") == "batch_invariant" and resolve_determinism("fp32", "fast") == "fast"


def test_kv_dtype_names():
    assert EngineConfig(kv_dtype="bfloat16").kv_dtype == "bf16" and EngineConfig(kv_dtype="int8").kv_dtype == "int8"
    with pytest.raises(ValueError, match="unknown KV-cache dtype 'fp8'"):
        EngineConfig(kv_dtype="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_device_without_gpu_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        LLM(str(tiny_llama), device="cuda", progress=False)
    with pytest.raises(ValueError, match="unknown device"):
        LLM(str(tiny_llama), device="tpu", progress=False)


def test_transformers_backend_takes_the_numerics_it_can_run(tiny_llama):
    import argparse

    from ditto.cli import make_backend

    args = argparse.Namespace(backend="transformers", model=str(tiny_llama), numerics="bf16", threads=None)
    backend = make_backend(args)
    assert backend.dtype == "bf16" and next(backend.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="fp32, bf16 or fp16"):
        make_backend(argparse.Namespace(backend="transformers", model=str(tiny_llama), numerics="w4", threads=None))
