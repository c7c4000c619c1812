"""The batched engine on a real (tiny, random-weight) model: batching, forks, prefix cache, preemption."""

from __future__ import annotations

import random

import pytest
import torch
from block_invariants import check_blocks

from ditto import LLM, SamplingParams
from ditto.sampling import mask_min_tokens


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), progress=False, max_num_seqs=32, max_num_batched_tokens=256, prefill_chunk=64)


def _prompts(llm, n, seed=0):
    rng = random.Random(seed)
    vocab = llm.loaded.config.vocab_size
    return [_ids(rng, vocab, rng.randrange(1, 120)) for _ in range(n)]


def _ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_batched_equals_alone(llm):
    """32 mixed-length prompts in one batch give, token for token, what each gives alone.

    In `fast` mode the linear layers use oneDNN GEMMs whose row results depend on the number of
    rows, so logprobs may move by float rounding (checked to 1e-5 here); tokens must not. The bitwise
    promise belongs to `batch_invariant` and is tested with torch.equal in test_determinism.py.
    """
    prompts = _prompts(llm, 32)
    batched = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, batched):
        alone = llm.generate([prompt], GREEDY)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert torch.allclose(torch.tensor(out.outputs[0].logprobs), torch.tensor(alone.outputs[0].logprobs), atol=1e-5)


def test_n_samples_compute_prompt_once(llm):
    prompt = _prompts(llm, 1, seed=1)[0] + list(range(3, 40))
    before = llm.engine.stats["prefill_tokens"]
    out = llm.generate([prompt], SamplingParams(n=8, temperature=0.9, seed=5, max_tokens=10, ignore_eos=True))[0]
    prefilled = llm.engine.stats["prefill_tokens"] - before
    assert prefilled <= len(prompt)  # once, not 8 times (less when the prefix cache already had it)
    assert sorted(c.index for c in out.outputs) == list(range(8))
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different sample indices, different noise
    # each sample equals the same (seed, index) drawn alone: forking changes nothing
    again = llm.generate([prompt], SamplingParams(n=8, temperature=0.9, seed=5, max_tokens=10, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in again.outputs]


def test_prefix_cache_shares_system_prompt(llm):
    system = list(range(3, 3 + 64))
    a = llm.generate([system + [100, 101]], GREEDY)[0]
    b = llm.generate([system + [102, 103, 104]], GREEDY)[0]
    assert b.metrics["cached_prompt_tokens"] >= 48
    cold = LLM(str(llm.loaded.path), progress=False, enable_prefix_caching=False)
    assert cold.generate([system + [102, 103, 104]], GREEDY)[0].outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].token_ids


def test_preemption_under_memory_pressure(tiny_llama):
    """A KV cache too small for the batch preempts and recomputes instead of crashing."""
    small = LLM(str(tiny_llama), progress=False, num_kv_blocks=24, block_size=8, max_num_seqs=16)
    prompts = _prompts(small, 10, seed=3)
    prompts = [p[:40] for p in prompts]
    outs = small.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert small.engine.stats["preemptions"] > 0
    assert all(len(o.outputs[0].token_ids) == 30 for o in outs)
    assert small.engine.blocks.num_free == 24


def test_score_under_preemption_equals_score_alone(tiny_llama):
    """Scoring requests preempted part-way through their prefill recompute their rows instead of appending
    them a second time: every logprob lines up with its token."""
    small = LLM(
        str(tiny_llama),
        progress=False,
        num_kv_blocks=24,
        block_size=8,
        max_num_seqs=16,
        prefill_chunk=16,
        max_num_batched_tokens=64,
        determinism="batch_invariant",
    )
    roomy = LLM(str(tiny_llama), progress=False, enable_prefix_caching=False, determinism="batch_invariant")
    rng = random.Random(3)
    vocab = small.loaded.config.vocab_size
    pairs = [(_ids(rng, vocab, 20), _ids(rng, vocab, 60)) for _ in range(6)]
    outs = small.score_batch(pairs)
    assert small.engine.stats["preemptions"] > 0
    # again, one step longer: the rows remembered from the first round are taken at admission and given back
    # when a full cache turns the request away or preempts it
    longer = [(prompt, cont + _ids(rng, vocab, 10)) for prompt, cont in reversed(pairs)]  # most recent first
    outs += small.score_batch(longer)
    pairs += longer
    assert small.engine_stats()["score_hit_tokens"] > 0
    for (prompt, cont), out in zip(pairs, outs):
        alone = roomy.score(prompt, cont)
        assert len(out.logprobs) == len(cont) and out.top_ids == alone.top_ids
        assert torch.equal(torch.tensor(out.logprobs), torch.tensor(alone.logprobs))


def test_chunked_prefill_and_stop(llm):
    prompt = _prompts(llm, 1, seed=4)[0] * 3
    whole = LLM(str(llm.loaded.path), progress=False, prefill_chunk=512).generate([prompt], GREEDY)[0]
    chunked = LLM(str(llm.loaded.path), progress=False, prefill_chunk=16).generate([prompt], GREEDY)[0]
    assert whole.outputs[0].token_ids == chunked.outputs[0].token_ids
    first = whole.outputs[0].token_ids[3]
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[first]))[0]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].token_ids[-1] == first


def test_min_tokens_masks_stop_tokens(llm):
    prompt = _prompts(llm, 1, seed=4)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    stop = free.token_ids[0]
    held = SamplingParams(temperature=0, max_tokens=8, min_tokens=4, stop_token_ids=[stop])
    out = llm.generate([prompt], held)[0].outputs[0]
    assert len(out.token_ids) >= 4 and stop not in out.token_ids[:4]


def test_mask_min_tokens_rows():
    logits = torch.zeros(3, 10)  # rows score generated tokens 1, 2, 3
    params = SamplingParams(max_tokens=5, min_tokens=3, stop_token_ids=(7, 42))
    out = mask_min_tokens(logits, params, {2}, start=1)
    assert out[:2, [2, 7]].isneginf().all() and out[:2].isfinite().sum() == 16 and out[2].isfinite().all()
    assert logits.isfinite().all()  # a masked copy
    assert mask_min_tokens(logits, params, {2}, start=3) is logits
    assert mask_min_tokens(logits, params.replace(ignore_eos=True), {2}) is logits


def test_stream_matches_generate(llm):
    prompt = _prompts(llm, 1, seed=6)[0]
    params = SamplingParams(temperature=0.7, seed=11, max_tokens=16, ignore_eos=True)
    ids = []
    for _, _, new in llm.stream(prompt, params):
        ids.extend(new)
    assert ids == llm.generate([prompt], params)[0].outputs[0].token_ids


def test_score_is_teacher_forced_logprobs(llm):
    prompt = _prompts(llm, 1, seed=7)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    scored = llm.score(prompt, out.token_ids)
    assert scored.top_ids == out.token_ids  # greedy tokens are the argmax under teacher forcing
    assert torch.allclose(torch.tensor(scored.logprobs), torch.tensor(out.logprobs), atol=1e-5)


def test_score_keeps_only_logprobs_unless_asked(llm):
    """Scoring reduces each position to (logprob, argmax) as it is computed; full logits only on request.

    The continuation spans several 64-token prefill chunks, so rows arrive over several engine steps.
    """
    prompt = _prompts(llm, 1, seed=11)[0]
    cont = [
        int(t) for t in torch.randint(3, llm.engine.cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(5))
    ]
    lean, full = llm.score(prompt, cont), llm.score(prompt, cont, keep_logits=True)
    assert full.logits.shape == (200, llm.engine.cfg.vocab_size) and full.hidden.shape[0] == 200
    assert not hasattr(lean, "logits") or lean.logits is None
    logp = torch.log_softmax(full.logits, dim=-1)[torch.arange(200), torch.tensor(cont)]
    assert torch.equal(torch.tensor(full.logprobs), logp) and full.top_ids == full.logits.argmax(-1).tolist()
    # the second call finds the prompt in the prefix cache, which under `fast` may move low bits
    assert torch.allclose(torch.tensor(lean.logprobs), logp, atol=1e-5)


def test_score_reuses_rows_of_a_scored_prefix_bit_for_bit(tiny_llama):
    """A longer continuation of an already-scored text computes only its new tokens, and its logprobs are
    the ones a cold engine computes (batch_invariant: rows do not depend on prefix-cache state)."""
    warm = LLM(str(tiny_llama), progress=False, determinism="batch_invariant", block_size=8, prefill_chunk=32)
    cold = LLM(str(tiny_llama), progress=False, determinism="batch_invariant", enable_prefix_caching=False)
    rng = random.Random(21)
    vocab = warm.loaded.config.vocab_size
    prompt = _ids(rng, vocab, 13)
    steps = [_ids(rng, vocab, rng.randrange(5, 30)) for _ in range(5)]
    text: list[int] = []
    for step in steps:  # a beam's partial solution, one step longer each round
        text = text + step
        before = dict(warm.engine_stats())
        out = warm.score(prompt, text)
        stats = warm.engine_stats()
        ref = cold.score(prompt, text)
        assert out.top_ids == ref.top_ids and torch.equal(torch.tensor(out.logprobs), torch.tensor(ref.logprobs))
        computed = stats["prefill_tokens"] - before["prefill_tokens"]
        reused = stats["score_hit_tokens"] - before["score_hit_tokens"]
        assert computed + stats["prefix_hit_tokens"] - before["prefix_hit_tokens"] == len(prompt) + len(text)
        if len(text) > len(step) + 8:  # a full block of earlier text with known rows: not computed again
            assert reused > 0 and computed < len(text)
    assert warm.engine.blocks.scored
    # scoring from an earlier point needs rows that were never scored: computed, still exact
    out, ref = warm.score(prompt[:5], prompt[5:] + text), cold.score(prompt[:5], prompt[5:] + text)
    assert torch.equal(torch.tensor(out.logprobs), torch.tensor(ref.logprobs))
    # full logits are never remembered: a request that keeps them computes every scored row
    full = warm.score(prompt, text, keep_logits=True)
    assert full.logits.shape == (len(text), vocab) and torch.equal(
        torch.tensor(full.logprobs), torch.tensor(ref.logprobs[-len(text) :])
    )
    check_blocks(warm.engine.blocks, [])


def test_score_turned_away_at_admission_gives_back_its_rows(tiny_llama):
    """A scoring request that found its prefix and rows in the cache but no room for the rest waits without
    them, and takes them again when it is admitted."""
    small = LLM(str(tiny_llama), progress=False, determinism="batch_invariant", num_kv_blocks=12, block_size=8)
    cold = LLM(str(tiny_llama), progress=False, determinism="batch_invariant", enable_prefix_caching=False)
    rng = random.Random(6)
    vocab = small.loaded.config.vocab_size
    prompt, cont = _ids(rng, vocab, 4), _ids(rng, vocab, 36)
    small.score(prompt, cont)  # 5 blocks, their rows remembered
    longer = cont + _ids(rng, vocab, 10)
    engine = small.engine
    engine.add_request("gen", _ids(rng, vocab, 60), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.add_request("score", prompt + longer, SamplingParams(temperature=0), score_from=len(prompt))
    hits = engine.blocks.stats["score_hit_tokens"]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.stats["score_hit_tokens"] - hits > len(longer)  # matched, turned away, matched again
    rows = engine.requests["score"].seqs[0].score_rows
    assert torch.equal(torch.tensor([r[0] for r in rows]), torch.tensor(cold.score(prompt, longer).logprobs))
    check_blocks(engine.blocks, [])


def test_score_rows_forgotten_with_their_blocks(tiny_llama):
    """Remembered rows go when their block is evicted; scoring after that recomputes, same bits."""
    small = LLM(str(tiny_llama), progress=False, determinism="batch_invariant", num_kv_blocks=12, block_size=8)
    cold = LLM(str(tiny_llama), progress=False, determinism="batch_invariant", enable_prefix_caching=False)
    rng = random.Random(4)
    vocab = small.loaded.config.vocab_size
    texts = [_ids(rng, vocab, 60) for _ in range(4)]
    for text in texts + texts:  # each text alone nearly fills the cache: the next one evicts it
        out = small.score(text[:4], text[4:])
        assert torch.equal(torch.tensor(out.logprobs), torch.tensor(cold.score(text[:4], text[4:]).logprobs))
        check_blocks(small.engine.blocks, [])
    assert small.engine_stats()["score_hit_tokens"] == 0  # by its second turn each text had been evicted


def test_score_rows_reduced_in_chunks_same_bits(tiny_llama, monkeypatch):
    """The runner turns scoring rows into logits SCORE_CHUNK rows at a time and returns only (logprob,
    argmax) unless full logits are kept; the chunk size changes no bit (batch_invariant)."""
    from ditto.engine import runner

    llm = LLM(str(tiny_llama), progress=False, determinism="batch_invariant", enable_prefix_caching=False)
    rng = random.Random(8)
    vocab = llm.loaded.config.vocab_size
    pairs = [(_ids(rng, vocab, 9), _ids(rng, vocab, 300)) for _ in range(3)]
    whole = llm.score_batch(pairs, keep_logits=True)
    monkeypatch.setattr(runner, "SCORE_CHUNK", 7)
    lean, kept = llm.score_batch(pairs), llm.score_batch(pairs, keep_logits=True)
    for (_, cont), w, a, b in zip(pairs, whole, lean, kept):
        logp = torch.log_softmax(w.logits, dim=-1)[torch.arange(len(cont)), torch.tensor(cont)]
        assert torch.equal(torch.tensor(w.logprobs), logp) and w.top_ids == w.logits.argmax(-1).tolist()
        assert torch.equal(torch.tensor(a.logprobs), logp) and a.top_ids == w.top_ids
        assert torch.equal(b.logits, w.logits) and torch.equal(b.hidden, w.hidden)


def test_request_output_shortcuts(llm):
    out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.text == out.outputs[0].text and out.token_ids == out.outputs[0].token_ids
    assert len(out.token_ids) == 6 and out.metrics["determinism"] == "batch_invariant"  # "auto" settled on CPU
