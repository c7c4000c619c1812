"""LLM.generate / LLM.score called from several threads at once: every caller's requests join one
continuous batch, and (batch_invariant) each result is bitwise what the caller gets alone."""

from __future__ import annotations

import threading

import pytest
import torch

from ditto import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33, 2], [7, 7, 60, 11], [3, 95, 4, 4, 4, 8, 21], [12, 13], [40, 41, 42, 43, 44, 45]]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), determinism="batch_invariant", threads=1, progress=False)


def test_threads_share_the_batch_and_match_alone(llm):
    params = [SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=i, n=2) for i in range(5)]
    alone = [llm.generate([p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    cont = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [2], [3, 3]]
    score_alone = [llm.score(p, c) for p, c in zip(PROMPTS, cont)]
    results: dict[int, object] = {}
    scores: dict[int, object] = {}
    start = threading.Barrier(10)
    widest = [0]
    real_step = llm.engine.step

    def step():  # record how many sequences were running together
        out = real_step()
        widest[0] = max(widest[0], len(llm.engine.scheduler.running))
        return out

    llm.engine.step = step
    try:

        def gen(i):
            start.wait()
            results[i] = llm.generate([PROMPTS[i]], [params[i]])[0]

        def sco(i):
            start.wait()
            scores[i] = llm.score(PROMPTS[i], cont[i])

        threads = [threading.Thread(target=gen, args=(i,)) for i in range(5)]
        threads += [threading.Thread(target=sco, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
    finally:
        llm.engine.step = real_step
    assert widest[0] > 2  # several callers' sequences were stepped together
    for i in range(5):
        assert [c.token_ids for c in results[i].outputs] == [c.token_ids for c in alone[i].outputs]
        for c, d in zip(results[i].outputs, alone[i].outputs):
            assert torch.equal(torch.tensor(c.logprobs), torch.tensor(d.logprobs))
        assert torch.equal(torch.tensor(scores[i].logprobs), torch.tensor(score_alone[i].logprobs))
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    assert not llm.engine.requests
