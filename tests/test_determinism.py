"""The determinism contract, tested bitwise (torch.equal on token ids and logprobs)."""

from __future__ import annotations

import random

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.engine.llm_engine import Request


def _rand_prompts(rng, n, vocab, lo=1, hi=90):
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _run_mixed(llm: LLM, needle, params, others, rng) -> list[float]:
    """Submit `others`, step a few times, then the needle, then more others mid-flight."""
    eng = llm.engine
    first, later = others[: len(others) // 2], others[len(others) // 2 :]
    reqs: list[Request] = []
    for i, p in enumerate(first):
        reqs.append(
            eng.add_request(f"o{i}", p, SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randrange(4, 20)))
        )
    for _ in range(rng.randrange(0, 3)):
        eng.step()
    needle_req = eng.add_request("needle", needle, params)
    for i, p in enumerate(later):
        eng.step()
        reqs.append(eng.add_request(f"l{i}", p, SamplingParams(temperature=0, max_tokens=rng.randrange(4, 20))))
    while not needle_req.finished or not all(r.finished for r in reqs):
        eng.step()
    seq = needle_req.seqs[0]
    for r in reqs + [needle_req]:
        eng.requests.pop(r.request_id)
    return seq.output_ids, seq.logprobs


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [16, 64, 512])
def test_needle_in_a_batch(tiny_dirs, numerics, chunk):
    """One prompt among 1..48 others, joining mid-flight, chunked prefill, prefix cache cold and warm:
    bit-identical to the prompt run alone."""
    _needle(str(tiny_dirs["qwen3"]), numerics, chunk, "cpu")


def test_needle_in_a_batch_layercast(tiny_dirs):
    """layercast's linears run on the C kernel without padding: rows must still never move."""
    _needle(str(tiny_dirs["qwen3"]), "layercast", 64, "cpu")


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_needle_in_a_batch_torch_attention(tiny_dirs, monkeypatch, numerics):
    """The same contract on the torch paged-attention path (no C compiler, or the kernel disabled)."""
    from ditto.engine import attention_c

    monkeypatch.setattr(attention_c, "supports", lambda k: False)
    _needle(str(tiny_dirs["gemma3"]), numerics, 64, "cpu")


@pytest.mark.parametrize(("family", "numerics", "chunk"), [("qwen3", "fp32", 16), ("gemma3", "bf16", 64)])
def test_needle_in_a_batch_gpu_kernels_on_cpu(tiny_dirs, monkeypatch, family, numerics, chunk):
    """The GPU path (fixed-tile layers, one-path tiled attention) forced on CPU: same contract, and
    the same tokens as the CPU path (its logic is right, not only self-consistent)."""
    path = str(tiny_dirs[family])
    cpu_path = _needle(path, numerics, chunk, "cpu", check=False)
    monkeypatch.setenv("DITTO_TILED_INVARIANT", "1")
    tiled = _needle(path, numerics, chunk, "cpu")
    assert tiled.token_ids == cpu_path.token_ids
    atol = 2e-2 if numerics == "bf16" else 1e-4  # bf16 activations: the two attention orders round apart
    assert torch.allclose(torch.tensor(tiled.logprobs), torch.tensor(cpu_path.logprobs), atol=atol)


@CUDA
@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [16, 512])
def test_needle_in_a_batch_cuda(tiny_dirs, numerics, chunk):
    _needle(str(tiny_dirs["qwen3"]), numerics, chunk, "cuda")


def _needle(path: str, numerics: str, chunk: int, device: str, check: bool = True):
    rng = random.Random(chunk)
    alone_llm = LLM(
        path,
        numerics=numerics,
        determinism="batch_invariant",
        progress=False,
        enable_prefix_caching=False,
        device=device,
    )
    vocab = alone_llm.loaded.config.vocab_size
    needle = _rand_prompts(rng, 1, vocab, 40, 150)[0]
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=3, max_tokens=24, ignore_eos=True)
    alone = alone_llm.generate([needle], params)[0].outputs[0]
    busy = LLM(
        path,
        numerics=numerics,
        determinism="batch_invariant",
        progress=False,
        prefill_chunk=chunk,
        max_num_batched_tokens=max(chunk, 96),
        max_num_seqs=64,
        device=device,
    )
    if not check:
        return alone
    for trial in range(2):  # trial 0: prefix cache cold; trial 1: warm (the needle's prefix is cached)
        others = _rand_prompts(rng, rng.randrange(1, 49), vocab)
        others.insert(rng.randrange(len(others) + 1), needle[: rng.randrange(17, len(needle))])  # shares a prefix
        ids, logprobs = _run_mixed(busy, needle, params, others, rng)
        assert ids == alone.token_ids, f"trial {trial}"
        assert torch.equal(torch.tensor(logprobs), torch.tensor(alone.logprobs)), f"trial {trial}"
    assert busy.engine.blocks.stats["prefix_hit_tokens"] > 0
    return alone


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_identical_concurrent_requests(tiny_dirs, device):
    """200 identical requests at once: one distinct output under batch_invariant; `fast` is reported."""
    path = str(tiny_dirs["llama"])
    prompt = list(range(5, 60))
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=12, ignore_eos=True)
    counts = {}
    for level in ("batch_invariant", "fast"):
        llm = LLM(path, determinism=level, progress=False, max_num_seqs=64, max_num_batched_tokens=512, device=device)
        outs = llm.generate([prompt] * 200, params)
        counts[level] = len({(tuple(o.outputs[0].token_ids), tuple(o.outputs[0].logprobs)) for o in outs})
    print(f"distinct outputs of 200 identical requests on {device}: {counts}")
    assert counts["batch_invariant"] == 1
