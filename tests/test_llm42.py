"""LLM-42 (ditto.llm42): a draft engine decodes, the batch_invariant reference verifies each window and
rolls back at the first disagreement; the outputs are the reference's own, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.llm42 import LLM42

PARAMS = [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.9, top_p=0.95, seed=3, max_tokens=24, ignore_eos=True, n=2, fingerprint_k=8),
    SamplingParams(temperature=1.1, min_p=0.02, repetition_penalty=1.2, seed=9, max_tokens=17, min_tokens=5),
]


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(6)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (4, 19, 9)]


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x.outputs) == len(y.outputs)
        for p, q in zip(x.outputs, y.outputs):
            assert p.token_ids == q.token_ids
            assert p.logprobs == q.logprobs  # floats from the same logits: equal, not close
            assert p.top_logprobs == q.top_logprobs and p.fingerprints == q.fingerprints
            assert (p.text, p.finish_reason, p.stop_reason) == (q.text, q.finish_reason, q.stop_reason)


@pytest.mark.parametrize(
    "draft", [{}, {"draft_numerics": "w4"}, {"draft_numerics": "bf16", "draft_determinism": "batch_invariant"}]
)
def test_outputs_are_batch_invariants(tiny_dirs, draft):
    """The same draft (fp32 fast), a much worse one (4-bit weights) and another numerics: every time the
    reference's tokens, logprobs, top logprobs, fingerprints, text and finish reasons."""
    path = str(tiny_dirs["llama"])
    opts = dict(progress=False, num_kv_blocks=256)
    ref = LLM(path, numerics="fp32", determinism="batch_invariant", **opts)
    prompts = _prompts(ref.loaded.config.vocab_size)
    want = ref.generate(prompts, PARAMS)
    llm = LLM42(path, numerics="fp32", window=5, **draft, **opts)
    _same(llm.generate(prompts, PARAMS), want)
    s = llm.stats
    assert s["windows"] > 1 and s["accepted"] + s["rollbacks"] <= s["drafted"]
    if draft.get("draft_numerics") == "w4":
        assert s["rollbacks"] > 0  # the 4-bit draft disagrees: rollbacks happened, the result did not change


def test_window_of_one_and_eos(tiny_dirs):
    """window=1 (every token verified alone) and a request that stops at EOS give the reference's output."""
    path = str(tiny_dirs["qwen3"])
    opts = dict(progress=False, num_kv_blocks=256)
    ref = LLM(path, numerics="fp32", determinism="batch_invariant", **opts)
    prompts = _prompts(ref.loaded.config.vocab_size)
    base = SamplingParams(temperature=0.9, seed=3, max_tokens=24, ignore_eos=True)
    toks = ref.generate(prompts[0], base)[0].outputs[0].token_ids
    at = next(i for i in range(2, len(toks)) if toks[i] not in toks[:i])  # a token first seen there
    sp = [base.replace(stop_token_ids=[toks[at]]), PARAMS[1]]
    want = ref.generate(prompts[:2], sp)
    assert want[0].outputs[0].finish_reason == "stop" and len(want[0].outputs[0].token_ids) == at + 1
    _same(LLM42(path, numerics="fp32", window=1, **opts).generate(prompts[:2], sp), want)


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        LLM42("x", window=0)


def test_a_resumed_sample_continues_as_if_uninterrupted(tiny_dirs):
    """LLMEngine.add_request(output_ids=, sample_index=): the rest of a sample from its first tokens is the
    uninterrupted sample's rest (same noise positions, penalties, max_tokens counted from the start)."""
    llm = LLM(str(tiny_dirs["llama"]), numerics="fp32", determinism="batch_invariant", progress=False)
    prompt = _prompts(llm.loaded.config.vocab_size)[1]
    sp = SamplingParams(temperature=1.0, seed=21, max_tokens=16, ignore_eos=True, repetition_penalty=1.3, n=2)
    full = llm.generate(prompt, sp)[0].outputs[1]  # sample 1
    req = llm.engine.add_request(
        "resumed", prompt, sp.replace(n=1).with_seed(), output_ids=full.token_ids[:6], sample_index=1
    )
    llm._run_until_done([req], False, "resuming")
    seq = req.seqs[0]
    assert seq.output_ids == full.token_ids and seq.logprobs == full.logprobs[6:]
    with pytest.raises(ValueError, match="resumed"):
        llm.engine.add_request("bad", prompt, sp, output_ids=[5])
