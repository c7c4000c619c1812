"""The KV cache is reserved uninitialised and a block is zeroed when the block manager hands it out.

Masked attention reads the whole last block of a sequence (scores of future slots are masked to -inf,
then exp gives 0 and 0 * v is added): a NaN or Inf in an unwritten slot would poison the row
(0 * NaN = NaN). These tests fill the cache with NaN before use, or poison blocks that eviction
returns to the free list, and check the results are bit-identical (torch.equal) to a cache that
was zeroed by hand, on every attention path (C kernel, torch path, tiled, int8 KV, integer).
"""

from __future__ import annotations

import random

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.engine.block_manager import BlockManager
from ditto.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True)


def _tensors(cache) -> list[torch.Tensor]:
    """Every tensor of a float (KVCache) or integer (IntKVCache) cache."""
    extra = getattr(cache, "k_scale", []) + getattr(cache, "v_scale", [])
    extra += getattr(cache, "ka16", []) + getattr(cache, "ksa", [])
    return cache.k + cache.v + extra


def _fill(tensors: list[torch.Tensor], blocks: list[int] | None, value: float) -> None:
    """NaN for float tensors; for integer ones the largest value (garbage that is not zero)."""
    for t in tensors:
        v = value if t.dtype.is_floating_point else torch.iinfo(t.dtype).max
        if blocks is None:
            t.fill_(v)
        else:
            t[torch.tensor(blocks, dtype=torch.long)] = v


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _run(llm: LLM, prompts, params) -> list[tuple[list[int], torch.Tensor]]:
    outs = llm.generate(prompts, params, progress=False)
    return [(o.outputs[0].token_ids, torch.tensor(o.outputs[0].logprobs, dtype=torch.float64)) for o in outs]


def _same(a, b) -> None:
    assert len(a) == len(b)
    for (ta, la), (tb, lb) in zip(a, b):
        assert ta == tb
        assert torch.equal(la, lb)


PATHS = {
    "fp32 batch_invariant": dict(numerics="fp32", determinism="batch_invariant"),
    "fp32 batch_invariant torch attention": dict(numerics="fp32", determinism="batch_invariant", env="ATTN"),
    "fp32 batch_invariant tiled": dict(numerics="fp32", determinism="batch_invariant", env="TILED"),
    "bf16 int8-kv batch_invariant": dict(numerics="bf16", determinism="batch_invariant", kv_dtype="int8"),
    "integer exact": dict(numerics="integer", determinism="exact"),
}


def _llm(path, opts: dict, monkeypatch, **engine) -> LLM:
    opts = dict(opts)
    env = opts.pop("env", None)
    if env == "ATTN":
        monkeypatch.setenv("DITTO_ATTN_DISABLE_KERNEL", "1")
        from ditto.engine import attention_c

        monkeypatch.setattr(attention_c, "supports", lambda k: False)  # the kernel may be loaded already
    if env == "TILED":
        monkeypatch.setenv("DITTO_TILED_INVARIANT", "1")
    return LLM(str(path), progress=False, **opts, **engine)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_nan_filled_cache_gives_the_bits_of_a_zeroed_one(tiny_llama, path_name, monkeypatch):
    """A cache full of NaN before first use: every block is zeroed as it is handed out, so the
    tokens and logprobs equal those of a cache zeroed by hand."""
    opts = PATHS[path_name]
    zeroed = _llm(tiny_llama, opts, monkeypatch, block_size=8)
    _fill(_tensors(zeroed.engine.cache), None, 0.0)
    poisoned = _llm(tiny_llama, opts, monkeypatch, block_size=8)
    _fill(_tensors(poisoned.engine.cache), None, float("nan"))
    prompts = _prompts(zeroed.loaded.config.vocab_size, 6, seed=1)
    _same(_run(zeroed, prompts, GREEDY), _run(poisoned, prompts, GREEDY))
    _same(_run(zeroed, prompts[:3], SAMPLED), _run(poisoned, prompts[:3], SAMPLED))


@pytest.mark.parametrize("path_name", list(PATHS))
def test_block_reused_after_eviction_shows_no_stale_data(tiny_llama, path_name, monkeypatch):
    """A small cache: the second batch reuses blocks the first one freed (and evicted from the prefix
    cache). Those blocks are poisoned with NaN while free (stale data at its worst): the second batch
    is bit-identical to what a fresh, zeroed engine gives."""
    opts = PATHS[path_name]
    small = dict(block_size=8, num_kv_blocks=24, max_num_seqs=4)
    reused = _llm(tiny_llama, opts, monkeypatch, **small)
    vocab = reused.loaded.config.vocab_size
    _run(reused, _prompts(vocab, 6, seed=2), GREEDY)
    bm = reused.engine.blocks
    assert bm.num_free == bm.num_blocks
    _fill(_tensors(reused.engine.cache), list(bm.free), float("nan"))
    second = _prompts(vocab, 6, seed=3)
    fresh = _llm(tiny_llama, opts, monkeypatch, **small)
    _fill(_tensors(fresh.engine.cache), None, 0.0)
    _same(_run(fresh, second, GREEDY), _run(reused, second, GREEDY))


def test_first_used_block_is_zero_past_the_written_slots(tiny_llama):
    """After a prefill of 5 tokens into blocks of 8, the slots 5..7 of its block read zero, not the
    NaN the cache held before; blocks never handed out are left untouched (not committed)."""
    llm = LLM(str(tiny_llama), progress=False, block_size=8, num_kv_blocks=16)
    cache = llm.engine.cache
    _fill(_tensors(cache), None, float("nan"))
    eng = llm.engine
    req = eng.add_request("r", [5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    eng.step()
    seq = req.seqs[0]
    assert seq.finished and seq.block_table == []  # freed again; block 0 was the one it used
    for layer in range(len(cache.k)):
        assert torch.isfinite(cache.k[layer][0, :, :, :5]).all()  # written keys: K is (nb, Hkv, D, bs)
        assert torch.equal(cache.k[layer][0, :, :, 5:], torch.zeros_like(cache.k[layer][0, :, :, 5:]))
        assert torch.equal(cache.v[layer][0, :, 5:], torch.zeros_like(cache.v[layer][0, :, 5:]))
        assert torch.isnan(cache.k[layer][1:]).all()  # never handed out: never written


def test_manager_reports_every_block_it_hands_out():
    """Fresh blocks, blocks reused after eviction and copy-on-write targets all come back from
    take_clears, each before the step that uses it; cached prefix blocks that are shared do not."""
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Sequence("a", list(range(10)), GREEDY, 0)
    bm.allocate(a, 10)
    assert bm.take_clears() == a.block_table == [0, 1, 2]
    bm.commit(a, 10)
    child = Sequence("a", list(range(10)), GREEDY, 1)
    bm.fork(a, child)
    child.output_ids.append(99)
    bm.allocate(child, 1)  # copy-on-write of the shared, partly filled last block
    ((src, dst),) = bm.take_copies()
    assert bm.take_clears() == [dst] and src == 2
    bm.free_seq(a)
    bm.free_seq(child)
    b = Sequence("b", list(range(8)) + [50, 51], GREEDY, 0)  # shares two cached full blocks with a
    bm.match_prefix(b)
    assert b.block_table == [0, 1] and bm.take_clears() == []
    bm.allocate(b, 2)
    assert bm.take_clears() == b.block_table[2:]  # an evicted block, reused: zeroed again
