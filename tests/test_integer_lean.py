"""The integer mode's lean decoder forward (ditto/numerics/integer_lean.py) and its fused C layer steps:
each step is bit-exact with the torch reference chain (any thread count, and without -march=native),
and whole models give the same token ids and integer logits on the lean path as on the module path."""

from __future__ import annotations

import pytest
import torch
from kernel_build import use_portable_build
from test_exact import GREEDY, SAMPLED, Recorder, _prompts, exact_llm
from test_integer_elementwise_kernel import assert_same, epilogue_case, ints, rope_tables, torch_epilogue, torch_rmsnorm

from ditto import SamplingParams
from ditto.numerics import integer_lean
from ditto.numerics.kernels import integer_elementwise_c as kern
from ditto.numerics.kernels import integer_ops as iops

pytestmark = [
    pytest.mark.skipif(not kern.kernel_available(), reason=f"kernel: {kern.kernel_status()}"),
    pytest.mark.usefixtures("no_bound_checks"),
]


def _norm(d: int, g: torch.Generator, oshift: int) -> tuple[torch.Tensor, int, int, int]:
    return torch.randint(-(1 << 23), 1 << 23, (d,), generator=g), 30, 7, oshift


# ----------------------------------------------------------------------------- res_norm_quant
def res_norm_case(t: int, d: int, with_acc: bool, post: bool, seed: int):
    """Inputs of ditto_res_norm_quant and the torch chain's results (x after the add, z, quantize_rows(z))."""
    g = torch.Generator().manual_seed(seed)
    x = ints((t, d), 29, g, torch.int32)
    nxt = _norm(d, g, 2)
    epi = post_n = None
    ref_x = x.clone()
    if with_acc:
        acc, a16, sa, parts = epilogue_case(t, [d], g, wild=seed % 2 == 1)
        h = torch_epilogue(acc, a16, sa, parts)
        if post:
            post_n = _norm(d, g, -1)
            h = torch_rmsnorm(h, *post_n)
        ref_x = ref_x + h  # int32, wrapping like the model's residual add
        epi = (acc, a16, sa, kern.EpilogueParams.build(parts))
    z = torch_rmsnorm(ref_x, *nxt)
    args = (x, kern.NormParams.build(*nxt), epi, None if post_n is None else kern.NormParams.build(*post_n))
    return args, (ref_x, z, *iops.quantize_rows(z))


@pytest.mark.parametrize("t,d", [(1, 8), (3, 64), (17, 576)])
@pytest.mark.parametrize("with_acc,post", [(False, False), (True, False), (True, True)])
def test_res_norm_quant(t, d, with_acc, post):
    for seed in (t + d, t + d + 1):
        args, (ref_x, z, q, a16, sa) = res_norm_case(t, d, with_acc, post, seed)
        got = kern.res_norm_quant(*args)
        assert_same(args[0], ref_x)  # the residual, updated in place
        assert_same(got, (z, q, a16, sa))


# ----------------------------------------------------------------------------- qkv_post
def qkv_case(t: int, heads: tuple[int, int, int], norm: bool, seed: int):
    """Inputs of ditto_qkv_post, and the torch chain's q8 / qa16 / qsa and caches after the store."""
    h, kv, d = heads
    g = torch.Generator().manual_seed(seed)
    acc, a16, sa, parts = epilogue_case(t, [h * d, kv * d, kv * d], g, wild=seed % 2 == 1)
    parts[2] = (parts[2][0], parts[2][1], parts[2][2], 128)  # v: the int8 cache format's limit
    parts[0] = (parts[0][0], parts[0][1], parts[0][2], 1 << 30)
    y = torch_epilogue(acc, a16, sa, parts)  # (T, N) int32
    cos, sin = rope_tables(d)
    pos = torch.randint(0, cos.shape[0], (t,), generator=g)
    nb, bs = t // 4 + 3, 4
    slots = torch.randperm(nb * bs, generator=g)[:t]
    norms, qn, kn = None, None, None
    if norm:
        qn, kn = _norm(d, g, -2), _norm(d, g, 1)
        norms = (kern.NormParams.build(*qn), kern.NormParams.build(*kn))
    qx, kx, v = y[:, : h * d].view(t, h, d), y[:, h * d : (h + kv) * d].view(t, kv, d), y[:, (h + kv) * d :]
    if norm:
        qx, kx = torch_rmsnorm(qx, *qn), torch_rmsnorm(kx, *kn)
    q_ref = iops.quantize_rows(iops.rope_int(qx, pos, cos, sin, 14))
    k8, ka, ks = iops.quantize_rows(iops.rope_int(kx, pos, cos, sin, 14))
    cache = (
        torch.randint(-127, 128, (nb, bs, kv, d), generator=g, dtype=torch.int8),
        torch.randint(1, 1 << 15, (nb, bs, kv, 1), generator=g, dtype=torch.int32),
        torch.randint(0, 17, (nb, bs, kv, 1), generator=g, dtype=torch.int8),
        torch.randint(-127, 128, (nb, bs, kv, d), generator=g, dtype=torch.int8),
    )
    ref_cache = tuple(c.clone() for c in cache)
    for dst, src in zip(ref_cache, (k8, ka, ks, v.reshape(t, kv, d).to(torch.int8))):  # IntegerPagedAttention._store
        dst.view(-1, *dst.shape[2:])[slots] = src.to(dst.dtype)
    args = (acc, a16, sa, kern.EpilogueParams.build(parts), heads, norms, pos, cos, sin, slots, cache)
    return args, q_ref, ref_cache


@pytest.mark.parametrize("t", [1, 2, 13])
@pytest.mark.parametrize("heads", [(1, 1, 2), (4, 2, 16), (9, 3, 64)])
@pytest.mark.parametrize("norm", [False, True])
def test_qkv_post(t, heads, norm):
    for seed in (t * 5 + heads[2], t * 5 + heads[2] + 1):
        args, q_ref, ref_cache = qkv_case(t, heads, norm, seed)
        got = kern.qkv_post(*args)
        assert_same(got, q_ref)
        assert_same(args[-1], ref_cache)


def test_qkv_post_rejects_bad_indices():
    args, _, _ = qkv_case(3, (2, 1, 8), False, 0)
    with pytest.raises(ValueError):
        kern.qkv_post(*args[:9], torch.tensor([0, 1, 10_000]), args[10])  # slot past the cache
    with pytest.raises(ValueError):
        kern.qkv_post(*args[:6], torch.tensor([0, 1, 300]), *args[7:])  # position past the RoPE table


# ----------------------------------------------------------------------------- GEMV
def gemv_case(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.randint(-128, 128, (1, k), generator=g, dtype=torch.int8)
    if n > 2:
        w[0], w[1] = 127, -128  # the extremes of every product
        x[0, ::2] = -128
    return x, w


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (16, 64), (17, 65), (33, 130), (832, 576), (576, 1536), (1000, 2048)])
def test_gemv(n, k):
    """Exact int32 x @ w.T for one row, every N and K tail (also x, w = -128, which quantize_rows never makes)."""
    x, w = gemv_case(n, k, n + k)
    ref = torch.matmul(x.long(), w.long().T).to(torch.int32)  # exact: |sum| < 2^31
    got = kern.gemv(x, w, kern.row_sums(w))
    assert_same(got, ref)
    assert_same(got, iops.int8_matmul(x, w))  # the integer reference's GEMM


# ----------------------------------------------------------------------------- threads, portable build
def _both(seed: int):
    outs, refs = [], []
    x, w = gemv_case(1000, 577, seed)
    outs.append(kern.gemv(x, w, kern.row_sums(w)))
    refs.append(torch.matmul(x.long(), w.long().T).to(torch.int32))
    args, ref = res_norm_case(37, 576, True, True, seed)
    outs += [*kern.res_norm_quant(*args), args[0]]
    refs += [*ref[1:], ref[0]]
    args, q_ref, ref_cache = qkv_case(37, (9, 3, 64), True, seed)
    outs += [*kern.qkv_post(*args), *args[-1]]
    refs += [*q_ref, *ref_cache]
    return outs, refs


def test_threads_agree():
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            assert_same(*map(tuple, _both(5)))
    finally:
        torch.set_num_threads(threads)


def test_portable_build_equals_torch(monkeypatch, tmp_path):
    """Built without -march=native the fused layer steps give the same bits."""
    use_portable_build(monkeypatch, tmp_path, kern)
    assert_same(*map(tuple, _both(6)))


# ----------------------------------------------------------------------------- whole models
def _run(llm, prompts, params, lean: bool, monkeypatch):
    calls = []
    real = integer_lean.LeanIntDecoder.forward
    if not lean:  # the lean run keeps the real `usable`: the engine's steps must pick the lean path themselves
        monkeypatch.setattr(integer_lean.LeanIntDecoder, "usable", staticmethod(lambda x, ctx: False))
    monkeypatch.setattr(integer_lean.LeanIntDecoder, "forward", lambda self, *a: calls.append(1) or real(self, *a))
    rec = Recorder(llm)
    outs = llm.generate(prompts, params)
    llm.engine.sample = rec.inner
    monkeypatch.undo()
    return [o.outputs[0].token_ids for o in outs], rec.rows, len(calls)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_lean_forward_equals_module_path(tiny_dirs, family, monkeypatch):
    """Token ids and every step's integer logits: the lean forward (mixed prefill chunks and decode rows,
    greedy and sampled) against the module path it replaces."""
    llm = exact_llm(tiny_dirs[family], prefill_chunk=16, max_num_batched_tokens=40, max_num_seqs=4)
    prompts = _prompts(5, 4, llm.loaded.config.vocab_size)
    params = [GREEDY, SAMPLED, GREEDY, SamplingParams(temperature=1.1, seed=3, max_tokens=8, ignore_eos=True), SAMPLED]
    for ps, pp in ((prompts, params), (prompts[:1], [SAMPLED]), (prompts[1:2], [GREEDY])):  # batches; one stream
        ids_lean, rows_lean, n_lean = _run(llm, ps, pp, True, monkeypatch)
        ids_mod, rows_mod, n_mod = _run(llm, ps, pp, False, monkeypatch)
        assert n_lean > 0 and n_mod == 0
        assert ids_lean == ids_mod
        assert rows_lean.keys() == rows_mod.keys()
        for k in rows_mod:
            assert len(rows_lean[k]) == len(rows_mod[k])
            assert all(torch.equal(a, b) for a, b in zip(rows_lean[k], rows_mod[k]))


def test_lean_forward_needs_every_layer_on_the_kernel_path(tiny_dirs):
    model = exact_llm(tiny_dirs["llama"]).loaded.model
    assert integer_lean.LeanIntDecoder.build(model) is not None
    model.layers[1].attn.kernel_ok = False
    assert integer_lean.LeanIntDecoder.build(model) is None
