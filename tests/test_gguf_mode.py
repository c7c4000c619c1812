"""Numerics `gguf`: the bundled files run on their own blocks, batch invariant, fused without changing a bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditto import LLM, SamplingParams
from ditto.loader.load import load
from ditto.loader.registry import bundled_path
from ditto.numerics.gguf_native import BlockEmbedding, GGUFBlock, GGUFLinear, RowRMSNorm
from ditto.numerics.kernels.gguf_blocks import block_linear

PROMPTS = ["What is 17 * 23?", "Name three primes.", "Say hello in French, then count to five."]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", numerics="gguf", progress=False, kv_cache_gb=0.25, threads=2)


def _run(llm: LLM, prompts: list[str], n: int = 12) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0)
    outs = llm.generate([llm.encode(p) for p in prompts], params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _logprob_tensor(lps: list[float]) -> torch.Tensor:
    return torch.tensor(lps, dtype=torch.float64)


def test_loads_without_decoding_blocks():
    loaded = load("smollm2-135m-instruct", progress=False, keep_blocks=True)
    q = loaded.model.layers[0].attn.q_proj
    assert q.weight.is_meta and q.gguf_source.kind == "Q4_1"
    assert loaded.model.embed.weight.is_meta and loaded.model.embed.gguf_source.kind == "Q8_0"
    assert not loaded.model.norm.weight.is_meta  # F32 tensors are read as before


def test_runs_on_blocks_fused(llm):
    model = llm.numerics.model
    assert all(isinstance(b, GGUFBlock) for b in model.layers) and llm.numerics.info["lean_layers"] == 30
    layer = model.layers[0].block
    attn, mlp = layer.attn, layer.mlp
    assert isinstance(attn.qkv_proj, GGUFLinear) and attn.q_proj is None
    assert isinstance(mlp.gate_up_proj, GGUFLinear) and mlp.gate_proj is None
    assert isinstance(model.embed, BlockEmbedding) and isinstance(model.lm_head, GGUFLinear)
    assert model.lm_head.kind == "Q8_0" and llm.numerics.info["weight_blocks"] == ["Q4_1", "Q8_0"]
    assert isinstance(layer.input_norm, RowRMSNorm) and isinstance(model.norm, RowRMSNorm)


def test_fusion_changes_no_bit():
    loaded = load("smollm2-135m-instruct", progress=False, keep_blocks=True)
    attn = loaded.model.layers[3].attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([block_linear(x, p.gguf_source.rows(), p.gguf_source.kind) for p in parts], dim=-1)
    from ditto.numerics.gguf_native import fuse_linears

    fused = fuse_linears([GGUFLinear.from_linear(p) for p in parts])
    assert torch.equal(fused(x), alone)


def test_lean_blocks_change_no_bit(llm):
    """GGUFBlock calls the same kernels as the modules it wraps: the same tokens and logprobs, bit for bit."""
    model = llm.numerics.model
    lean_layers = model.layers
    lean = _run(llm, PROMPTS)
    model.layers = nn.ModuleList(b.block for b in lean_layers)
    try:
        modules = _run(llm, PROMPTS)
    finally:
        model.layers = lean_layers
    assert [t for t, _ in lean] == [t for t, _ in modules]
    assert all(torch.equal(_logprob_tensor(a), _logprob_tensor(b)) for (_, a), (_, b) in zip(lean, modules))


def test_lut_and_multiply_add_give_the_same_bits(llm, monkeypatch):
    """Single-row calls take the lookup-table kernel (here from the first one on), batches
    multiply-add; turning the LUT off changes no token and no logprob bit."""
    from ditto.numerics import gguf_native

    monkeypatch.setattr(gguf_native, "LUT_AFTER_CALLS", 1)
    linears = [m for m in llm.numerics.model.modules() if isinstance(m, GGUFLinear)]
    assert llm.numerics.info["lut_linears"] == sum(m.lut_ok for m in linears) == 120  # every Q4_1 linear
    with_lut = _run(llm, PROMPTS[:1])
    assert all(m.lut is not None for m in linears if m.lut_ok)
    for m in linears:
        m.lut_ok = False
    try:
        without = _run(llm, PROMPTS[:1])
    finally:
        for m in linears:
            m.lut_ok = m.lut is not None
    assert with_lut[0][0] == without[0][0]
    assert torch.equal(_logprob_tensor(with_lut[0][1]), _logprob_tensor(without[0][1]))


def test_embedding_rows_equal_the_decoded_table():
    full = load("smollm2-135m-instruct", progress=False)
    emb = BlockEmbedding(full.model.embed.gguf_source.rows(), "Q8_0", 576)
    ids = torch.tensor([0, 1, 17, 4096, 49151])
    assert torch.equal(emb(ids), full.model.embed.weight[ids])


def test_batch_invariant_by_construction(llm):
    together = _run(llm, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = _run(llm, [prompt])[0]
        assert alone[0] == together[i][0]
        assert torch.equal(_logprob_tensor(alone[1]), _logprob_tensor(together[i][1]))
    torch.set_num_threads(1)
    try:
        one_thread = _run(llm, PROMPTS[::-1])[::-1]
    finally:
        torch.set_num_threads(2)
    assert [t for t, _ in one_thread] == [t for t, _ in together]
    assert all(torch.equal(_logprob_tensor(a), _logprob_tensor(b)) for (_, a), (_, b) in zip(one_thread, together))


def test_batch_invariant_level_accepted(llm):
    bi = LLM("smollm2-135m-instruct", numerics="gguf", determinism="batch_invariant", progress=False, kv_cache_gb=0.25)
    a, b = _run(bi, PROMPTS[:1])[0], _run(llm, PROMPTS[:1])[0]
    assert a[0] == b[0] and torch.equal(_logprob_tensor(a[1]), _logprob_tensor(b[1]))


def test_gemma_k_quants_unfused_where_types_differ():
    if not _has("gemma3-270m"):
        pytest.skip("gemma3-270m package not installed")
    llm = LLM("gemma3-270m", numerics="gguf", progress=False, kv_cache_gb=0.25)
    kinds = llm.numerics.info["weight_blocks"]
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(kinds)
    layers = llm.numerics.model.layers
    fused = [getattr(blk, "block", blk).attn.qkv_proj is not None for blk in layers]
    assert any(fused) and not all(fused)  # v is Q8_0 in half of the layers: those stay three calls
    out = _run(llm, ["The capital of France is"], n=6)[0]
    assert len(out[0]) == 6 and torch.isfinite(_logprob_tensor(out[1])).all()


def test_hf_folder_is_refused_clearly(tiny_llama):
    with pytest.raises(ValueError, match="GGUF file's own weight blocks"):
        LLM(str(tiny_llama), numerics="gguf", progress=False, kv_cache_gb=0.05)


def _has(name: str) -> bool:
    try:
        return bundled_path(name).exists()
    except Exception:
        return False
