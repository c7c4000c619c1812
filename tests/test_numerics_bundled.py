"""Every numerics mode on both real bundled models, through the public LLM API.

One fp32 reference per model; each mode is then built from the same GGUF, scores a fixed text
teacher-forced (next-token agreement with fp32 and the mean KL against it) and generates greedily.
The floors are loose (measured values in MODE_FLOOR's comment, roughly halved margins): they catch a
mode that is broken on a real architecture (wrong scales, a lost tie, a Gemma norm mis-cast), not
small quality changes — `ditto quality` measures those on 64k tokens.
"""

from __future__ import annotations

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.loader.load import load
from ditto.numerics.base import list_modes

pytestmark = pytest.mark.slow

TEXT = (
    "To solve the equation 3x + 5 = 20, subtract 5 from both sides to get 3x = 15, then divide by 3. "
    "So x = 5. Check: 3 * 5 + 5 = 20, which is correct. The answer is 5."
)
MODELS = ("smollm2-135m-instruct", "gemma3-270m")
# top-1 agreement with fp32 on TEXT (measured: float modes and int8-weight modes 0.95-1.0, w4 0.7-0.9,
# integer ~0.9; w8a8 0.84-0.93 on SmolLM2: its per-token int8 rounding turns 1e-7 changes in attention
# into flipped quanta, so on 67 tokens it moves by a few tokens — on 2k tokens it is 92-93% either way);
# a broken mode lands near 0
MODE_FLOOR = {"w4": 0.6, "w4-g128": 0.6, "w4-asym": 0.6, "w4-g128-asym": 0.6, "integer": 0.7, "w8a8": 0.75}
KL_CEILING = {"fp32": 0.0, "bf16": 0.02, "fp16": 0.01, "layercast": 0.002}


def _logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    out = llm.score(ids[:1], ids[1:], keep_logits=True)
    return out.logits.float().log_softmax(-1)


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
    loaded = load(request.param, progress=False)  # loaded once; every mode works on its own copy
    llm = LLM(loaded, determinism="fast", progress=False)  # the level the modes below run at
    ids = llm.encode(TEXT)
    return request.param, loaded, ids, _logprobs(llm, ids)


@pytest.mark.parametrize("mode", list_modes())
def test_mode_runs_bundled_model(reference, mode):
    name, loaded, ids, ref = reference
    if (name, mode) == ("gemma3-270m", "fp16"):
        # Gemma 3's activations exceed fp16's range (65504): the documented limit of the fp16 mode
        llm = LLM(loaded, numerics=mode, progress=False)
        assert not torch.isfinite(_logprobs(llm, ids)).all()
        return
    llm = LLM(loaded, numerics=mode, determinism="exact" if mode == "integer" else "fast", progress=False)
    lp = _logprobs(llm, ids)
    assert lp.shape == ref.shape and torch.isfinite(lp).all()
    agree = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert agree >= MODE_FLOOR.get(mode, 0.85), (name, mode, agree, kl)
    if mode in KL_CEILING:
        assert kl <= KL_CEILING[mode], (name, mode, kl)
    if mode == "fp32":
        assert torch.equal(lp, ref)  # a second fp32 instance is bitwise the reference
    out = llm.generate([ids[:12]], SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 8
    assert all(0 <= t < llm.loaded.config.vocab_size for t in out.token_ids)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks  # every block released


@pytest.mark.parametrize("numerics", ["fp32", "bf16", "gguf"])
def test_batch_invariant_on_the_real_model(numerics):
    """SmolLM2's real shapes (the tiny models' may take other kernel regimes): each prompt alone gives
    the same tokens and logprob bits as inside a batch of eight."""
    llm = LLM("smollm2-135m-instruct", numerics=numerics, determinism="batch_invariant", progress=False,
              kv_cache_gb=0.25)  # fmt: skip
    prompts = [llm.encode(p) for p in (TEXT, "What is 12 * 7?", "Name a prime.", "Count to five.")] * 2
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    together = llm.generate(prompts, sp)
    for i in (0, 1, 2, 3, 7):
        alone = llm.generate([prompts[i]], sp)[0].outputs[0]
        assert alone.token_ids == together[i].outputs[0].token_ids
        assert torch.equal(torch.tensor(alone.logprobs), torch.tensor(together[i].outputs[0].logprobs))
