"""Bitwise batch-invariance tests for ditto.numerics.kernels.batch_invariant (CPU).

Method (from the anchors): a row computed inside a batch of M must equal, with torch.equal, the
same row computed alone - for many M (1..300 random + edges), positions and neighbours.
"""

from __future__ import annotations

import random

import pytest
import torch

from ditto.numerics.kernels import batch_invariant as bi

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
VOCAB = (576, 49152)
EDGE_MS = [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 31, 33, 64, 65, 96, 97, 129, 255, 300]


def _ms(seed: int, n: int = 8, hi: int = 300) -> list[int]:
    rng = random.Random(seed)
    return sorted(set(EDGE_MS + [rng.randint(1, hi) for _ in range(n)]))


@pytest.fixture(params=[1, 2], ids=["t1", "t2"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _check_rowwise(fn, xs: torch.Tensor, ms: list[int], seed: int) -> None:
    """fn(xs[a:a+M])[j] == fn(xs[a+j:a+j+1])[0] for every M, a random offset a, every row j."""
    alone = torch.cat([fn(xs[i : i + 1]) for i in range(xs.shape[0])])
    rng = random.Random(seed)
    for m in ms:
        a = rng.randint(0, xs.shape[0] - m)
        y = fn(xs[a : a + m])
        assert y.shape[0] == m
        if not torch.equal(y, alone[a : a + m]):
            bad = [j for j in range(m) if not torch.equal(y[j], alone[a + j])]
            raise AssertionError(f"M={m} offset={a}: rows {bad[:10]} differ from the row computed alone")


def _data(k: int, n: int, dtype: torch.dtype, rows: int = 320, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


requires_kernel = pytest.mark.skipif(not bi.kernel_available(), reason=f"C kernel: {bi.kernel_status()}")


# ---------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("n,k", [(1, 3), (64, 5), (100, 37), (576, 576), (130, 64)])
def test_pack_weight_layout(n, k):
    """Panel p, column j of the packed copy is weight row 64p + j; rows past N are zeros."""
    w = torch.randn(n, k)
    data = bi.pack_weight(w).data  # (panels, K, 64)
    panels = -(-n // 64)
    padded = torch.cat([w, torch.zeros(panels * 64 - n, k)])  # (panels * 64, K)
    assert data.shape == (panels, k, 64)
    assert torch.equal(data, padded.view(panels, 64, k).transpose(1, 2))


@requires_kernel
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("mode", ["fp32", "bf16", "layercast"])
def test_linear_rows_invariant(k, n, mode, threads):
    x, w, b = _data(k, n, torch.float32, bias=(k, n) == (576, 1536))
    if mode == "bf16":
        x, w, b = x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()
    elif mode == "layercast":
        w = w.bfloat16()
    _check_rowwise(lambda t: bi.invariant_linear(t, w, b), x, _ms(k + n + threads), seed=k * n)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_vocab_shape(dtype, threads):
    k, n = VOCAB
    x, w, _ = _data(k, n, torch.float32, rows=80)
    x, w = x.to(dtype), w.to(dtype)
    _check_rowwise(lambda t: bi.invariant_linear(t, w), x, [1, 2, 3, 7, 13, 33, 64, 80], seed=1)


@requires_kernel
def test_linear_neighbours_do_not_matter():
    """Same row, different (extreme) neighbours and batch composition -> same bits."""
    x, w, _ = _data(576, 576, torch.float32)
    row = x[5:6]
    ref = bi.invariant_linear(row, w)
    for filler in (torch.zeros(40, 576), torch.full((40, 576), 1e30), torch.randn(40, 576) * 1e-20):
        for pos in (0, 7, 39):
            batch = filler.clone()
            batch[pos] = row[0]
            assert torch.equal(bi.invariant_linear(batch, w)[pos : pos + 1], ref)


@requires_kernel
def test_linear_thread_count_does_not_matter():
    """The kernel's per-element order is a fixed FMA chain: 1 and 2 threads agree bitwise."""
    x, w, b = _data(576, 1536, torch.float32, rows=100, bias=True)
    wb = w.bfloat16()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, al = bi.invariant_linear(x, w, b), bi.invariant_linear(x, wb, b)
        torch.set_num_threads(2)
        c, cl = bi.invariant_linear(x, w, b), bi.invariant_linear(x, wb, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, c) and torch.equal(al, cl)


@requires_kernel
def test_linear_matches_fma_chain_reference():
    """Bits are defined: y = fma chain over k (from +0) + bias. Checked against a scalar fp64 emulation.

    fp32*fp32 is exact in fp64 and one fp64 add followed by rounding to fp32 equals fmaf except in
    double-rounding ties, which do not occur for this data.
    """
    x, w, b = _data(64, 70, torch.float32, rows=3, bias=True)
    y = bi.invariant_linear(x, w, b)
    acc = torch.zeros(3, 70, dtype=torch.float32)
    for kk in range(64):
        acc = (x[:, kk : kk + 1].double() * w[:, kk].double() + acc.double()).float()
    assert torch.equal(y, acc + b)


@requires_kernel
def test_linear_close_to_torch_and_layouts():
    x, w, b = _data(576, 192, torch.float32, rows=50, bias=True)
    y = bi.invariant_linear(x, w, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # strided (non-contiguous) input rows and slices give the same bits
    big = torch.zeros(50, 700)
    big[:, 10:586] = x
    assert torch.equal(bi.invariant_linear(big[:, 10:586], w, b), y)
    assert torch.equal(bi.invariant_linear(x.t().contiguous().t(), w, b), y)
    assert bi.invariant_linear(x[:0], w, b).shape == (0, 192)
    # in-place weight update invalidates the packing cache
    w2 = w.clone()
    y1 = bi.invariant_linear(x, w2)
    w2.mul_(2)
    assert torch.equal(bi.invariant_linear(x, w2), y1 * 2)


@requires_kernel
@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_invariant_linear_module(compute_dtype):
    lin = torch.nn.Linear(576, 192, bias=True)
    if compute_dtype is torch.float32:  # layercast: bf16 weights, fp32 compute
        lin = lin.to(torch.bfloat16)
    mod = bi.InvariantLinear.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(2, 37, 576)
    y = mod(x)
    assert y.shape == (2, 37, 192) and y.dtype == torch.float32
    assert torch.equal(mod(x[1, 5:6]), y[1, 5:6])
    torch.testing.assert_close(
        y, torch.nn.functional.linear(x, lin.weight.float(), lin.bias.float()), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------------------------------------- row ops

ROW_OPS = {
    "log_softmax": bi.invariant_log_softmax,
    "softmax": bi.invariant_softmax,
    "logsumexp": bi.invariant_logsumexp,
    "sum": bi.invariant_sum,
    "mean": bi.invariant_mean,
    "argmax": bi.invariant_argmax,
    "rms_norm": lambda t: bi.invariant_rms_norm(t, torch.linspace(0.5, 1.5, t.shape[-1]).to(t.dtype), 1e-6),
}


@pytest.mark.parametrize("v", [576, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_ops_invariant(op, dtype, v, threads):
    g = torch.Generator().manual_seed(3)
    rows = 200 if v < 4096 else 48
    x = (torch.randn(rows, v, generator=g) * 4).to(dtype)
    ms = _ms(v, n=6, hi=rows) if v < 4096 else [1, 2, 3, 7, 31, 32, 33, 48]
    _check_rowwise(ROW_OPS[op], x, [m for m in ms if m <= rows], seed=v)


def test_row_ops_keep_leading_dims():
    x = torch.randn(2, 3, 50)
    assert bi.invariant_sum(x).shape == (2, 3)
    assert bi.invariant_sum(x, keepdim=True).shape == (2, 3, 1)
    assert torch.equal(bi.invariant_argmax(x), x.argmax(-1))
    torch.testing.assert_close(bi.invariant_log_softmax(x), torch.log_softmax(x, -1))
    torch.testing.assert_close(bi.invariant_logsumexp(x), torch.logsumexp(x, -1))
    with pytest.raises(ValueError):
        bi.invariant_sum(x, dim=0)


# ---------------------------------------------------------------------------------------------- bmm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_,d,s", [(1, 64, 16), (3, 64, 16), (8, 128, 16), (1, 64, 64)])
def test_bmm_fixed_shape_invariant_to_batch_count(g_, d, s, dtype, threads):
    """Paged attention: QK^T per KV block (G x D)@(D x S) and P@V (G x S)@(S x D), batch = blocks*Hkv."""
    gen = torch.Generator().manual_seed(5)
    n = 400 if g_ in (3, 1) else 128
    q = torch.randn(n, g_, d, generator=gen).to(dtype)
    k = torch.randn(n, d, s, generator=gen).to(dtype)
    p = torch.randn(n, g_, s, generator=gen).to(dtype)
    v = torch.randn(n, s, d, generator=gen).to(dtype)
    for a, b in ((q, k), (p, v)):
        alone = torch.cat([bi.invariant_bmm(a[i : i + 1], b[i : i + 1]) for i in range(n)])
        for cnt in [1, 2, 5, 17, 84, 235, 400]:
            off = (cnt * 7) % (n - cnt + 1)
            assert torch.equal(bi.invariant_bmm(a[off : off + cnt], b[off : off + cnt]), alone[off : off + cnt]), cnt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_sum_index_add_invariant(dtype):
    """Per-sequence sums across KV blocks with index_add_: a sequence's sum is the same alone or batched."""
    gen = torch.Generator().manual_seed(4)
    nblk = torch.randint(1, 10, (100,), generator=gen)
    seg = torch.repeat_interleave(torch.arange(100), nblk)
    vals = torch.randn(len(seg), 8, 64, generator=gen).to(dtype)
    starts = torch.cumsum(nblk, 0) - nblk
    full = torch.zeros(100, 8, 64, dtype=dtype).index_add_(0, seg, vals)
    for s in range(100):
        v = vals[starts[s] : starts[s] + nblk[s]]
        alone = torch.zeros(1, 8, 64, dtype=dtype).index_add_(0, torch.zeros(len(v), dtype=torch.long), v)
        assert torch.equal(full[s], alone[0]), s


def test_release_unpacked_keeps_the_bits_and_drops_the_weight():
    if not bi.kernel_available():
        pytest.skip(bi.kernel_status())
    gen = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(96, 80, bias=True)
    x = torch.randn(5, 96, generator=gen)
    inv = bi.InvariantLinear.from_linear(lin, compute_dtype=torch.float32)
    before = inv(x)
    assert inv.release_unpacked()
    assert inv.weight.is_meta and tuple(inv.weight.shape) == (80, 96)
    assert torch.equal(inv(x), before)
    assert torch.equal(inv(x[2:3]), before[2:3])


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v with biases
@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_fused_projections_change_no_bit(tiny_dirs, family, numerics, monkeypatch):
    """Under batch_invariant on the C kernels, q/k/v and gate/up run as one linear each; every output
    element is its own chain over K, so the fused model gives the unfused one's bits (sampled tokens
    and logprobs, a batch of prompts)."""
    from ditto import LLM, SamplingParams
    from ditto.numerics.kernels import bf16_linear, padded

    if numerics == "bf16" and not bf16_linear.kernel_available():
        pytest.skip(f"bf16 kernel not built: {bf16_linear.kernel_status()}")
    if not bi.kernel_available():
        pytest.skip("fp32 C kernel not built")
    prompts = [[1, 5, 9, 2], [3, 4], [7, 7, 8, 1, 2, 6]]
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=10, logprobs=0)

    def run():
        llm = LLM(str(tiny_dirs[family]), numerics=numerics, determinism="batch_invariant", progress=False)
        block = llm.engine.runner.model.layers[0]
        return llm.generate(prompts, params), block

    fused, block = run()
    assert isinstance(block.attn.qkv_proj, bi.InvariantLinear) and block.attn.q_proj is None
    assert isinstance(block.mlp.gate_up_proj, bi.InvariantLinear) and block.mlp.gate_proj is None
    monkeypatch.setattr(padded, "fuse_on_c_kernels", lambda group, act_dtype: None)
    plain, block = run()
    assert block.attn.qkv_proj is None and isinstance(block.attn.q_proj, bi.InvariantLinear)
    for a, b in zip(fused, plain):
        assert a.token_ids == b.token_ids
        assert torch.equal(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs))
