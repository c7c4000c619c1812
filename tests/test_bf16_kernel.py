"""The fixed-order bf16 linear (numerics/kernels/bf16_linear.py): bit for bit its torch contract on
every instruction-set path, at every M, for any row order and thread count; close to float64; the
contract is what the CPU's own vdpbf16ps does; bf16@batch_invariant rows never move in the engine."""

from __future__ import annotations

import random

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.numerics.kernels import batch_invariant as bi
from ditto.numerics.kernels import bf16_linear as bl

pytestmark = pytest.mark.skipif(not bl.kernel_available(), reason=f"bf16 kernel: {bl.kernel_status()}")
SHAPES = ((64, 70), (37, 130), (96, 64))  # (K, N): odd K, partial panels, one full panel


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)  # compares -0.0 / +0.0 and every NaN payload too


def _data(k: int, n: int, rows: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    return x, w, b


@pytest.fixture(scope="module")
def cases():
    """(x, w, bias, packed, reference) per shape; the reference is the slow torch contract."""
    out = []
    for i, (k, n) in enumerate(SHAPES):
        x, w, b = _data(k, n, seed=i)
        bias = b if i != 1 else None
        out.append((x, w, bias, bl.pack_weight(w), bl.reference_linear(x, w, bias)))
    return out


def test_every_path_equals_the_reference_at_every_m(cases):
    for x, _, bias, packed, ref in cases:
        for isa in bl.isa_paths():
            for m in (*range(1, 65), 200):
                assert torch.equal(_bits(bl.linear(x[:m], packed, bias, isa=isa)), _bits(ref[:m])), (isa, m)


def test_rows_permuted_and_thread_counts(cases):
    x, _, bias, packed, ref = cases[0]
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for isa in bl.isa_paths():
                assert torch.equal(_bits(bl.linear(x[perm], packed, bias, isa=isa)), _bits(ref[perm])), (isa, threads)
                assert torch.equal(_bits(bl.linear(x[7:8], packed, bias, isa=isa)), _bits(ref[7:8])), (isa, threads)
    finally:
        torch.set_num_threads(old)


def test_subnormals_and_cancellation_follow_the_contract():
    """DAZ on bf16 inputs, FTZ after each step: tiny values (products below FLT_MIN, subnormal inputs,
    sums that cancel to the subnormal range) give the reference's bits on every path."""
    g = torch.Generator().manual_seed(5)
    k, n = 40, 64
    x = (torch.randn(24, k, generator=g) * 2.0 ** -torch.randint(62, 72, (24, k), generator=g)).bfloat16()
    w = (torch.randn(n, k, generator=g) * 2.0 ** -torch.randint(62, 72, (n, k), generator=g)).bfloat16()
    x[0, :4] = torch.tensor([1e-39, -1e-39, 5e-40, 1.0]).bfloat16()  # bf16 subnormals (and a 1)
    w[:, 3] = 2.0**-126  # x[0, 3] * w[:, 3] is FLT_MIN exactly
    b = torch.zeros(n).bfloat16()
    b[:8] = torch.tensor([1e-39, -(2.0**-126), 2.0**-125, 0.0, -0.0, 3e-39, 1.0, -1.0]).bfloat16()
    ref = bl.reference_linear(x, w, b)
    assert (ref == 0).any() and (ref != 0).any()
    packed = bl.pack_weight(w)
    for isa in bl.isa_paths():
        assert torch.equal(_bits(bl.linear(x, packed, b, isa=isa)), _bits(ref)), isa


def test_close_to_float64(cases):
    for x, w, bias, packed, _ in cases:
        exact = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        got = bl.linear(x, packed, bias).double()
        err = (got - exact).abs()
        bound = exact.abs() * 2.0**-8 + x.shape[1] * 2.0**-20  # half a bf16 ulp, plus fp32 accumulation
        assert (err <= bound).all(), err.max().item()


@pytest.mark.skipif("avx512_bf16" not in bl.isa_paths(), reason="no AVX512_BF16 on this CPU")
def test_contract_is_what_vdpbf16ps_computes(cases):
    """The emulating paths agree with the instruction itself on this CPU (every case above), and a
    K=2 product (one vdpbf16ps step per element) matches the reference on random magnitudes."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(64, 2, generator=g) * 2.0 ** torch.randint(-70, 20, (64, 2), generator=g)).bfloat16()
    w = (torch.randn(64, 2, generator=g) * 2.0 ** torch.randint(-70, 20, (64, 2), generator=g)).bfloat16()
    b = (torch.randn(64, generator=g) * 2.0 ** torch.randint(-130, 0, (64,), generator=g)).bfloat16()
    ref = bl.reference_linear(x, w, b)
    assert torch.equal(_bits(bl.linear(x, bl.pack_weight(w), b, isa="avx512_bf16")), _bits(ref))


def test_isa_environment_variable_and_errors(monkeypatch, cases):
    x, _, bias, packed, ref = cases[0]
    for isa in bl.isa_paths():
        monkeypatch.setenv(bl.ISA_ENV, isa)
        assert torch.equal(_bits(bl.linear(x[:9], packed, bias)), _bits(ref[:9])), isa
    monkeypatch.setenv(bl.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="DITTO_BF16_ISA"):
        bl.linear(x[:2], packed, bias)
    monkeypatch.delenv(bl.ISA_ENV)
    with pytest.raises(ValueError, match="isa='sse9'"):
        bl.linear(x[:2], packed, bias, isa="sse9")
    with pytest.raises(ValueError, match="bf16"):
        bl.linear(x[:2].float(), packed, bias)
    assert bl.linear(x[:0], packed, bias).shape == (0, packed.n)


def test_invariant_linear_routes_bf16_to_the_kernel(cases):
    x, w, bias, _, ref = cases[0]
    inv = bi.InvariantLinear(w, bias, compute_dtype=torch.bfloat16)
    assert torch.equal(_bits(inv(x)), _bits(ref))
    assert torch.equal(_bits(bi.invariant_linear(x[3:5], w, bias)), _bits(ref[3:5]))
    assert inv.release_unpacked() and inv.weight.is_meta and inv.weight.dtype == torch.bfloat16
    assert isinstance(inv._packed, bl.PackedBf16)
    assert torch.equal(_bits(inv(x[:1])), _bits(ref[:1]))


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # untied and tied LM heads
def test_engine_rows_alone_equal_rows_in_a_batch(tiny_dirs, family):
    """bf16@batch_invariant: every linear (lm_head too) runs on the kernel without padding, and a
    prompt's tokens and logprobs are the same alone as inside a batch of others."""
    llm = LLM(str(tiny_dirs[family]), numerics="bf16", determinism="batch_invariant", progress=False)
    lins = [m for m in llm.engine.runner.model.modules() if isinstance(m, bi.InvariantLinear)]
    assert lins and all(isinstance(m._packed, bl.PackedBf16) for m in lins)
    assert any(name.endswith("lm_head") for name, m in llm.engine.runner.model.named_modules() if m in lins)
    rng = random.Random(0)
    vocab = llm.loaded.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(5, 60))] for _ in range(12)]
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0] for p in prompts[:3]]
    batch = llm.generate(prompts, params)
    for a, b in zip(alone, batch[:3], strict=True):
        assert a.token_ids == b.outputs[0].token_ids
        assert torch.equal(torch.tensor(a.logprobs), torch.tensor(b.outputs[0].logprobs))


_FALLBACK = """
import random, sys, torch
from ditto import LLM, SamplingParams
from ditto.numerics.kernels import bf16_linear as bl
llm = LLM(sys.argv[1], numerics="bf16", determinism="batch_invariant", progress=False)
packed = [m for m in llm.engine.runner.model.modules() if isinstance(getattr(m, "_packed", None), bl.PackedBf16)]
rng = random.Random(0)
prompts = [[rng.randrange(3, 200) for _ in range(rng.randrange(5, 40))] for _ in range(8)]
params = SamplingParams(temperature=0.8, seed=4, max_tokens=8, ignore_eos=True)
alone = [llm.generate([p], params)[0].outputs[0] for p in prompts[:2]]
batch = llm.generate(prompts, params)
same = all(a.token_ids == b.outputs[0].token_ids and torch.equal(torch.tensor(a.logprobs),
           torch.tensor(b.outputs[0].logprobs)) for a, b in zip(alone, batch))
print(bl.kernel_available(), len(packed), same, bl.kernel_status())
"""


def test_without_the_kernel_bf16_stays_batch_invariant(tiny_dirs):
    """DITTO_BF16_DISABLE_KERNEL=1 (or no compiler): bf16@batch_invariant falls back to its other invariant
    linears (padded oneDNN GEMMs where this CPU's are invariant), slower, with the same promise -- a prompt
    alone equals the prompt inside a batch."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, DITTO_BF16_DISABLE_KERNEL="1", OMP_NUM_THREADS="2")
    run = subprocess.run(
        [sys.executable, "-c", _FALLBACK, str(tiny_dirs["llama"])], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[:4] == ["False", "0", "True", "disabled"], run.stdout
