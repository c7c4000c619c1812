"""Integer kernels: each op against a float64 reference within its stated bound, exactness of the
integer helpers, and bit-identical results across thread counts and batch composition."""

from __future__ import annotations

import math
import random

import pytest
import torch
from integer_reference import gumbel_argmax_int, linear_int

from ditto.numerics.kernels import integer_ops as iops
from ditto.sampling import gumbel_noise


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_int(shape, lo, hi, seed=0):
    return torch.randint(lo, hi, shape, generator=gen(seed), dtype=torch.int64)


# ----------------------------------------------------------------------------- exact helpers
def test_isqrt_exact_small_range_and_random_large():
    n = torch.arange(0, 200_000, dtype=torch.int64)
    ref = torch.tensor([math.isqrt(v) for v in range(200_000)])
    assert torch.equal(iops.isqrt(n), ref)
    rng = random.Random(1)
    big = [rng.randrange(1 << rng.randrange(1, 62)) for _ in range(5000)] + [(1 << 62) - 1, 1 << 61, 2**40, 2**40 - 1]
    assert iops.isqrt(torch.tensor(big)).tolist() == [math.isqrt(v) for v in big]
    # powers of two and their neighbours, squares and their neighbours: the slowest starts for Newton
    edges = [(1 << k) + d for k in range(62) for d in (-2, -1, 0, 1, 2)]
    edges += [(r * r) + d for r in (3, 2**20 - 1, 2**31 - 1) for d in (-1, 0, 1)]
    edges = [v for v in edges if 0 <= v < 1 << 62]
    assert iops.isqrt(torch.tensor(edges)).tolist() == [math.isqrt(v) for v in edges]


def test_bit_length_exact():
    rng = random.Random(2)
    vals = [0, 1, 2, 3, (1 << 62), I := (1 << 63) - 1] + [rng.randrange(1 << rng.randrange(1, 63)) for _ in range(3000)]
    assert I == (1 << 63) - 1
    assert iops.bit_length(torch.tensor(vals)).tolist() == [v.bit_length() for v in vals]


def test_dyadic_and_requantise_match_floor_rule():
    for scale in [1.0, 0.5, 3.0, 1e-3, 0.0123456, 7.77e5, 2.0**-40, 1 / 127]:
        m, e = iops.dyadic(scale)
        assert e >= 0 and abs(m / 2**e - scale) <= scale * 2.0**-30
    x = rand_int((10_000,), -(1 << 31), 1 << 31, seed=3)
    for m, e in [(3, 2), (12345, 17), (1, 0), (2**31 - 1, 40), (5, 1)]:
        got = iops.requantise(x, m, e)
        ref = torch.tensor([math.floor(v * m / 2**e + 0.5) for v in x.tolist()])  # exact dyadic: exact in float
        ref_int = torch.tensor([(v * m + ((1 << e) >> 1)) >> e for v in x.tolist()])
        assert torch.equal(got, ref_int)
        if m < 2**20:
            assert torch.equal(got, ref)


def test_requantise_overflow_is_caught():
    with pytest.raises(OverflowError):
        iops.requantise(torch.tensor([1 << 40]), 1 << 30, 10)


def test_log2_and_exp_fixed_accuracy():
    rng = random.Random(4)
    n = torch.tensor([1, 2, 3, 1000] + [rng.randrange(1, 1 << rng.randrange(2, 63)) for _ in range(20000)])
    got = iops.log2_fixed(n).double() / 2**30
    ref = torch.tensor([math.log2(v) for v in n.tolist()], dtype=torch.float64)
    err = (got - ref).abs().max().item()
    assert err < 2e-8, err
    x = -rand_int((50_000,), 0, 40 << 16, seed=5)  # exp(x), x in [-40, 0], Q16
    e = iops.exp_neg_fixed(x, 16).double() / 2**30
    ref = torch.exp(x.double() / 2**16)
    assert ((e - ref).abs() <= ref * 1e-7 + 2 * 2.0**-30).all()


# ----------------------------------------------------------------------------- GEMM + quantisation
@pytest.mark.parametrize("shape", [(1, 8, 8), (5, 33, 7), (64, 576, 192)])
def test_int8_matmul_exact(shape):
    M, K, N = shape
    a = rand_int((M, K), -127, 128, seed=6).to(torch.int8)
    w = rand_int((N, K), -127, 128, seed=7).to(torch.int8)
    assert torch.equal(iops.int8_matmul(a, w).long(), a.long() @ w.long().T)


def test_int_matmul_limbs_exact():
    w = rand_int((9, 40), -127, 128, seed=8).to(torch.int8)
    for bits, signed in [(20, False), (20, True), (31, True)]:
        lo = 0 if not signed else -(1 << bits) + 1
        a = rand_int((6, 40), lo, 1 << bits, seed=9)
        assert torch.equal(iops.int_matmul_limbs(a, w, bits, signed), a @ w.long().T)


def test_quantize_rows_bounds():
    x = torch.cat([rand_int((50, 300), -(1 << 30), 1 << 30, seed=10), rand_int((50, 300), -20, 20, seed=11)])
    x[3] = 0
    q, a16, sa = iops.quantize_rows(x)
    assert q.dtype == torch.int8 and (a16 <= 1 << 15).all() and (q.abs() <= 127).all()
    step = a16.double() * 2.0 ** sa.double() / 127  # x ~= q * step
    ideal = x.double() / step
    assert ((q.double() - ideal).abs() <= 0.5 + 1e-6).all()
    assert (q[3] == 0).all()


def test_linear_int_vs_float():
    T, K, N = 7, 256, 48
    xf = torch.randn(T, K, generator=gen(12), dtype=torch.float64) * 3
    wf = torch.randn(N, K, generator=gen(13), dtype=torch.float64) * 0.05
    s_x, s_out = 2.0**-16, 2.0**-12
    x = torch.round(xf / s_x).long()
    s_w = wf.abs().amax(1) / 127
    w = torch.round(wf / s_w[:, None]).to(torch.int8)
    me = [iops.dyadic(s_x * float(sw) / (127 * s_out), 18) for sw in s_w]
    m, e = torch.tensor([a for a, _ in me]), torch.tensor([b for _, b in me])
    q, a16, sa = iops.quantize_rows(x)
    y = linear_int(q, a16, sa, w, m, e).double() * s_out
    ref = xf @ wf.T
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel  # int8 x int8: ~1% relative


# ----------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("s_x", [2.0**-12, 2.0**-21])  # the second needs the per-row pre-shift
def test_rmsnorm_int_vs_float(s_x):
    D = 576
    out_frac, eps = 16, 1e-5
    xf = (
        torch.randn(20, D, generator=gen(14), dtype=torch.float64)
        * torch.logspace(-3, 2, 20, dtype=torch.float64)[:, None]
    )
    xf[0, 5] = 900.0  # an outlier channel
    gamma = torch.rand(D, generator=gen(15), dtype=torch.float64) * 2 + 0.1
    x = torch.round(xf / s_x).long()
    gm, ge = iops.rmsnorm_params(gamma, out_frac)
    eps_int = round(eps / s_x**2)  # eps is carried in units of s_x^2
    y = iops.rmsnorm_int(x, gm, ge, eps_int).double() / 2**out_frac
    xq = x.double() * s_x
    ref = xq / torch.sqrt((xq * xq).mean(-1, keepdim=True) + eps_int * s_x**2) * gamma
    assert ((y - ref).abs() <= ref.abs() * 2.0**-20 + 1.0 * 2.0**-out_frac).all()


# ----------------------------------------------------------------------------- softmax
def test_softmax_int_vs_float_with_masks():
    frac, B = 16, 20
    xf = torch.randn(64, 300, generator=gen(16), dtype=torch.float64) * 6
    lengths = torch.randint(1, 301, (64,), generator=gen(17))
    mask = torch.arange(300)[None, :] < lengths[:, None]
    x = torch.round(xf * 2**frac).long()
    p = iops.softmax_int(x, frac, B, mask)
    ref = torch.softmax((x.double() / 2**frac).masked_fill(~mask, float("-inf")), -1)
    err = (p.double() / 2**B - ref).abs().max().item()
    assert err <= 2.0**-B + 1e-6, err
    assert (p[~mask] == 0).all()
    sums = p.sum(-1)
    assert ((sums - (1 << B)).abs() <= lengths // 2 + 1).all()
    # a row padded with masked columns gives the same integers as the row alone
    r = 5
    alone = iops.softmax_int(x[r : r + 1, : lengths[r]], frac, B)
    assert torch.equal(alone[0], p[r, : lengths[r]])
    # fully masked row -> zeros
    assert (iops.softmax_int(x[:1], frac, B, torch.zeros_like(mask[:1])) == 0).all()


def test_log_softmax_int_vs_float():
    frac = 20
    xf = torch.randn(16, 1000, generator=gen(18), dtype=torch.float64) * 5
    x = torch.round(xf * 2**frac).long()
    got = iops.log_softmax_int(x, frac).double() / 2**frac
    ref = torch.log_softmax(x.double() / 2**frac, -1)
    assert (got - ref).abs().max().item() < 1e-6 + 2.0**-frac


# ----------------------------------------------------------------------------- activations, RoPE
@pytest.mark.parametrize("frac", [12, 20])
def test_activations_vs_float(frac):
    xf = torch.cat(
        [torch.linspace(-30, 30, 20001, dtype=torch.float64), torch.randn(5000, generator=gen(19)).double() * 4]
    )
    x = torch.round(xf * 2**frac).long()
    xq = x.double() / 2**frac
    lsb = 2.0**-frac
    sig = iops.sigmoid_int(x, frac).double() / 2**30
    assert (sig - torch.sigmoid(xq)).abs().max().item() < 2e-7
    silu = iops.silu_int(x, frac).double() * lsb
    assert ((silu - torch.nn.functional.silu(xq)).abs() <= lsb + 2e-7 * xq.abs()).all()
    gelu = iops.gelu_tanh_int(x, frac).double() * lsb
    ref = torch.nn.functional.gelu(xq, approximate="tanh")
    assert ((gelu - ref).abs() <= lsb + 1e-6 * xq.abs()).all()


def test_rope_int_vs_float():
    d, T, H = 64, 50, 3
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cos, sin = iops.rope_tables(inv_freq, 4096)
    assert cos.abs().max() <= 1 << 14
    pos = torch.randint(0, 4096, (T,), generator=gen(20))
    x = rand_int((T, H, d), -(1 << 20), 1 << 20, seed=21)
    got = iops.rope_int(x, pos, cos, sin).double()
    ang = pos.double()[:, None] * inv_freq[None, :]
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    x1, x2 = x[..., : d // 2].double(), x[..., d // 2 :].double()
    ref = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    assert (got - ref).abs().max().item() <= 0.5 + 1.5 * 2.0**-14 * (1 << 20)


# ----------------------------------------------------------------------------- sampling noise
def test_gumbel_noise_int_matches_float_and_distribution():
    V = 200_000
    g = iops.gumbel_noise_int(seed=7, sample_index=0, token_index=3, vocab_size=V).double() / 2**iops.NOISE_FRAC
    gf = gumbel_noise(7, 0, 3, V)
    assert (g - gf).abs().max().item() < 2e-6
    assert abs(g.mean().item() - 0.5772156649) < 0.01
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


def test_gumbel_from_bits_tails():
    # extreme hashes: u -> 0 and u -> 1
    bits = torch.tensor([0, 1, 2, 3, -1, -2, -5, (1 << 62), -(1 << 62), (1 << 63) - 1, -(1 << 63)], dtype=torch.int64)
    g = iops.gumbel_from_bits(bits).double() / 2**iops.NOISE_FRAC
    n = [2 * ((b & ((1 << 64) - 1)) >> 2) + 1 for b in bits.tolist()]
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    ref = [float(-((-(Decimal(k) / Decimal(2**63)).ln()).ln())) for k in n]
    assert max(abs(a - b) for a, b in zip(g.tolist(), ref)) < 2e-6


def test_gumbel_argmax_frequencies_match_softmax():
    logits_f = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -2.0], dtype=torch.float64)
    s = 2.0**-10
    logits = torch.round(logits_f / s).long()
    T = 0.8
    counts = torch.zeros(6)
    N = 4000
    for i in range(N):
        counts[gumbel_argmax_int(logits, s, T, seed=11, sample_index=i, token_index=0)] += 1
    p = torch.softmax(logits.double() * s / T, -1)
    chi2 = (((counts.double() - N * p) ** 2) / (N * p)).sum().item()
    assert chi2 < 25, (chi2, counts, p)  # 5 dof: p(chi2 > 25) ~ 1e-4 (fixed seeds: deterministic)
    # T = 0 is argmax; keep-mask excludes tokens
    assert gumbel_argmax_int(logits, s, 0.0, 0, 0, 0) == 3
    keep = torch.tensor([True, True, True, False, True, True])
    assert all(gumbel_argmax_int(logits, s, T, 3, i, 0, keep) != 3 for i in range(200))


def test_temperature_multiplier_exact():
    m, e = iops.temperature_multiplier(2.0**-10, 0.7)
    assert abs(m / 2**e / 2**iops.NOISE_FRAC - 2.0**-10 / 0.7) < 2.0**-10 / 0.7 * 2**-22


# ----------------------------------------------------------------------------- invariance
def _all_ops(x32: torch.Tensor) -> list[torch.Tensor]:
    D = x32.shape[-1]
    gm, ge = iops.rmsnorm_params(torch.linspace(0.5, 1.5, D), 16)
    w = rand_int((24, D), -127, 128, seed=30).to(torch.int8)
    q, a16, sa = iops.quantize_rows(x32)
    m = torch.full((24,), 3 << 16)
    e = torch.full((24,), 30)
    x16 = x32 >> 12
    return [
        iops.rmsnorm_int(x32, gm, ge, 1000),
        q,
        a16,
        sa,
        linear_int(q, a16, sa, w, m, e),
        iops.softmax_int(x16, 10, 20),
        iops.log_softmax_int(x16, 10),
        iops.silu_int(x16, 10),
        iops.gelu_tanh_int(x16, 10),
    ]


def test_ops_identical_across_threads_and_batch():
    x = rand_int((37, 128), -(1 << 28), 1 << 28, seed=31)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_ops(x)
        torch.set_num_threads(max(2, old))
        two = _all_ops(x)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    for r in (0, 17, 36):
        alone = _all_ops(x[r : r + 1])
        assert all(torch.equal(a[0], b[r]) for a, b in zip(alone, one))


def test_rmsnorm_int_tiny_gain_keeps_shifts_in_range():
    x = rand_int((8, 128), -(1 << 12), 1 << 12, seed=40)
    gm, ge = torch.full((128,), 3 << 20), 40  # output ~ x / rms * 3 * 2^-20: a long right shift
    y = iops.rmsnorm_int(x, gm, ge, 0).double()
    xd = x.double()
    ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True)) * (3 * 2.0**20 / 2.0**40)
    assert ((y - ref).abs() <= 1 + ref.abs() * 2.0**-20).all()


def test_shipped_fixed_point_tables_are_the_computed_ones():
    """The exp2/log2 tables read at start-up (fixed_tables.json) are what `decimal` computes at 40 digits."""
    shipped = iops._tables("cpu")
    computed = iops.compute_tables()
    for name in ("exp2", "log2"):
        assert torch.equal(shipped[name], torch.tensor(computed[name], dtype=torch.int64)), name
    assert computed["exp2"][0] == 1 << 30 and computed["log2"][0] == 0 and computed["log2"][-1] == 1 << 30
