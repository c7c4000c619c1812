"""The fused C integer attention kernel is bit-exact with the torch reference (`attend_int` on the
gathered keys with the causal / sliding-window mask), for decode rows through a block table,
prefill chunks with start_pos > 0, GQA groups and fully masked rows; and the torch path is used
when the kernel is disabled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_build import use_portable_build

from ditto.engine.attention import DecodeRows, PrefillChunk
from ditto.numerics import integer as integer_mod
from ditto.numerics.integer import DenseIntContext, IntegerPagedAttention, IntKVCache
from ditto.numerics.kernels import integer_attention_c as kern
from ditto.numerics.kernels import integer_ops as iops

pytestmark = pytest.mark.skipif(not kern.kernel_available(), reason=f"kernel: {kern.kernel_status()}")


def _quantized(shape: tuple[int, ...], bits: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Realistic quantize_rows output of random ints |x| < 2^bits with per-row magnitudes."""
    mag = torch.randint(bits - 6, bits + 1, (*shape[:-1], 1), generator=g)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * (2.0**mag) / 3).round().clamp(-(2**30), 2**30)
    return iops.quantize_rows(x.long())


def make_case(
    t: int, heads: int, kv: int, d: int, blocks: int, bs: int, seed: int, wild: bool = False
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], int, int]:
    """Random queries (T, H, D) and a random paged cache (blocks, bs, Hkv, .) in the kernel's dtypes."""
    g = torch.Generator().manual_seed(seed)
    q = _quantized((t, heads, d), 20, g)
    k8, ka16, ksa = _quantized((blocks, bs, kv, d), 20, g)
    v8 = torch.randint(-127, 128, (blocks, bs, kv, d), generator=g, dtype=torch.int8)
    if wild:  # extreme scales: many scores hit the +-(2^31 - 1) clamp, exp underflows to 0
        qa16 = torch.randint(1, (1 << 15) + 2, q[1].shape, generator=g)
        q = (q[0], qa16, torch.randint(0, 17, q[2].shape, generator=g))
        ka16 = torch.randint(1, (1 << 15) + 2, ka16.shape, generator=g)
        ksa = torch.randint(0, 17, ksa.shape, generator=g)
    cache = (k8, ka16.to(torch.int32), ksa.to(torch.int8), v8)
    scale = d**-0.5 * (1.0 if not wild else 300.0)
    score_m, score_e = iops.dyadic(scale * 2.0 ** (16 - 16 - 16) / 127**2, 18)
    return q, cache, score_m, score_e


def reference(q, cache, tokens, positions, table, table_row, window, score_m, score_e, out):
    """The torch path of IntAttention: gather each query's blocks, mask, attend_int, one query per batch row."""
    q8, qa16, qsa = q
    bs, kv = cache[0].shape[1], cache[0].shape[2]
    heads, d = q8.shape[1], q8.shape[2]
    g = heads // kv
    r, nb = len(tokens), table.shape[1]
    rows = table[table_row]  # (R, nb)
    kc, kac, ksc, vc = (c[rows].reshape(r, nb * bs, kv, -1) for c in cache)  # (R, L, Hkv, .)
    key_pos = torch.arange(nb * bs)[None]  # (1, L)
    mask = key_pos <= positions[:, None]  # (R, L)
    if window is not None:
        mask &= key_pos > positions[:, None] - window
    mask = mask[:, None, None, :].expand(r, 1, g, nb * bs)  # (R, 1, G, L)
    qg = tuple(z[tokens].view(r, kv, g, z.shape[-1]) for z in (q8, qa16, qsa))  # (R, Hkv, G, .)
    kg = (kc.permute(0, 2, 1, 3), kac.long().permute(0, 2, 1, 3), ksc.long().permute(0, 2, 1, 3))
    res = iops.attend_int(qg, kg, vc.permute(0, 2, 1, 3), mask, score_m, score_e, 16, 20)  # (R, Hkv, G, D)
    out[tokens] = res.reshape(r, heads, d)


def reference_chunk(q, cache, tok_start, start_pos, n, blocks, window, score_m, score_e, out):
    """The torch prefill path: one batch of n queries over the chunk's keys (attend_int with B = 1)."""
    q8, qa16, qsa = q
    kv = cache[0].shape[2]
    heads, d = q8.shape[1], q8.shape[2]
    g = heads // kv
    length = start_pos + n
    kc, kac, ksc, vc = (c[blocks].reshape(-1, kv, c.shape[-1])[:length][None] for c in cache)  # (1, L, Hkv, .)
    key_pos, q_pos = torch.arange(length)[None, None, :], torch.arange(start_pos, length)[None, :, None]
    mask = key_pos <= q_pos  # (1, n, L)
    if window is not None:
        mask &= key_pos > q_pos - window
    mask = mask[:, None, :, None, :].expand(1, 1, n, g, length).reshape(1, 1, n * g, length)
    idx = torch.arange(tok_start, tok_start + n)
    qg = tuple(integer_mod._group_heads(z[idx], 1, n, kv, g) for z in (q8, qa16, qsa))  # (1, Hkv, n*G, .)
    kg = (kc.permute(0, 2, 1, 3), kac.long().permute(0, 2, 1, 3), ksc.long().permute(0, 2, 1, 3))
    res = iops.attend_int(qg, kg, vc.permute(0, 2, 1, 3), mask, score_m, score_e, 16, 20)  # (1, Hkv, n*G, D)
    out[idx] = res.view(kv, n, g, d).permute(1, 0, 2, 3).reshape(n, heads, d)


DECODE_SHAPES = [  # (heads, kv heads, head dim, block size, window)
    (4, 2, 16, 4, None),
    (9, 3, 64, 16, None),
    (8, 1, 32, 8, 5),
    (6, 6, 24, 3, None),
    (10, 2, 80, 8, None),  # G = 5 > one 4-head tile, D = 80: a partial 64-byte chunk
]


@pytest.mark.parametrize("heads,kv,d,bs,window", DECODE_SHAPES)
@pytest.mark.parametrize("wild", [False, True])
def test_decode_rows_equal_torch(heads, kv, d, bs, window, wild):
    rows, nblocks = 7, 40
    q, cache, sm, se = make_case(rows + 3, heads, kv, d, nblocks, bs, seed=heads * 31 + d + wild, wild=wild)
    g = torch.Generator().manual_seed(5)
    nb = 6
    table = torch.randint(0, nblocks, (rows, nb), generator=g)  # (R, nb) shuffled blocks, padding included
    positions = torch.tensor([0, 1, bs - 1, bs, 3 * bs + 1, nb * bs - 1, -1])  # -1: a fully masked row
    tokens = torch.tensor([9, 0, 3, 4, 1, 7, 2])  # rows out of token order; tokens 5, 6, 8 untouched
    table_row = torch.arange(rows)
    ref = torch.full((rows + 3, heads, d), -7, dtype=torch.int64)
    got = ref.clone()
    reference(q, cache, tokens, positions, table, table_row, window, sm, se, ref)
    kern.attend_paged(q, cache, tokens, positions, table, table_row, window, sm, se, got)
    assert torch.equal(got, ref)
    assert torch.equal(got[2], torch.zeros(heads, d, dtype=torch.int64))  # fully masked row: exact zeros


@pytest.mark.parametrize("heads,kv,d,bs,window", DECODE_SHAPES)
@pytest.mark.parametrize("start_pos,n", [(0, 1), (0, 13), (11, 9), (29, 3)])
def test_prefill_chunk_equal_torch(heads, kv, d, bs, window, start_pos, n):
    nblocks, tok_start = 30, 2
    q, cache, sm, se = make_case(tok_start + n + 1, heads, kv, d, nblocks, bs, seed=start_pos * 7 + n + heads)
    length = start_pos + n
    blocks = torch.randperm(nblocks, generator=torch.Generator().manual_seed(n))[: -(-length // bs)]  # (nb,)
    ref = torch.full((tok_start + n + 1, heads, d), 3, dtype=torch.int64)
    got = ref.clone()
    reference_chunk(q, cache, tok_start, start_pos, n, blocks, window, sm, se, ref)
    tokens = torch.arange(tok_start, tok_start + n)
    positions = torch.arange(start_pos, length)
    kern.attend_paged(q, cache, tokens, positions, blocks[None], torch.zeros(n, dtype=torch.long), window, sm, se, got)
    assert torch.equal(got, ref)


def test_long_rows_and_threads_agree():
    """Long contexts (scores spread over the whole exp table) and any thread count give the same bits."""
    q, cache, sm, se = make_case(5, 9, 3, 64, 80, 16, seed=11)
    table = torch.randperm(80, generator=torch.Generator().manual_seed(2)).view(5, 16)  # (R, 16)
    positions, tokens, table_row = torch.tensor([255, 200, 17, 128, 0]), torch.arange(5), torch.arange(5)
    ref = torch.zeros(5, 9, 64, dtype=torch.int64)
    reference(q, cache, tokens, positions, table, table_row, None, sm, se, ref)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            got = torch.zeros_like(ref)
            kern.attend_paged(q, cache, tokens, positions, table, table_row, None, sm, se, got)
            assert torch.equal(got, ref)
    finally:
        torch.set_num_threads(threads)


def test_portable_build_equals_torch(monkeypatch, tmp_path):
    """Built without -march=native (plain C loops instead of the AVX-512 ones) the kernel gives the same bits."""
    use_portable_build(monkeypatch, tmp_path, kern)
    for heads, kv, d, bs, window in DECODE_SHAPES:
        q, cache, sm, se = make_case(6, heads, kv, d, 12, bs, seed=d)
        table = torch.randperm(12, generator=torch.Generator().manual_seed(d)).view(3, 4)  # (R, 4)
        tokens, positions, table_row = (
            torch.tensor([5, 0, 2, 3]),
            torch.tensor([0, 4 * bs - 1, 7, -1]),
            torch.tensor([0, 1, 2, 1]),
        )
        ref, got = torch.zeros(6, heads, d, dtype=torch.int64), torch.zeros(6, heads, d, dtype=torch.int64)
        reference(q, cache, tokens, positions, table, table_row, window, sm, se, ref)
        kern.attend_paged(q, cache, tokens, positions, table, table_row, window, sm, se, got)
        assert torch.equal(got, ref)


def test_bound_check_raises():
    q, cache, _, _ = make_case(2, 4, 2, 16, 4, 4, seed=3)
    q = (q[0], torch.full_like(q[1], (1 << 15) + 1), q[2])
    cache = (cache[0], torch.full_like(cache[1], (1 << 15) + 1), cache[2], cache[3])
    args = (torch.arange(2), torch.tensor([3, 5]), torch.arange(4)[None], torch.zeros(2, dtype=torch.long), None)
    old = iops._CHECKS
    try:
        iops.set_bound_checks(True)
        with pytest.raises(OverflowError):  # |t * score_m| >= 2^63
            kern.attend_paged(q, *(cache,), *args, (1 << 31) - 1, 40, torch.zeros(2, 4, 16, dtype=torch.long))
    finally:
        iops.set_bound_checks(old)


# ----------------------------------------------------------------------------- through IntAttention
def _attention_module(heads: int, kv: int, d: int, window: int | None, seed: int) -> integer_mod.IntAttention:
    """An IntAttention with random integer projections (only the attention math is under test)."""
    att = integer_mod.IntAttention.__new__(integer_mod.IntAttention)
    torch.nn.Module.__init__(att)
    att.layer, att.h, att.kv, att.d, att.window = 0, heads, kv, d, window
    att.score_m, att.score_e = iops.dyadic(d**-0.5 * 2.0**-16 / 127**2, 18)
    att.o_m, att.o_e = torch.full((heads, d), 1 << 20), torch.full((heads, d), 24)
    g = torch.Generator().manual_seed(seed)
    att._test_qkv = lambda t: (
        (torch.randn(t, heads, d, generator=g) * 2.0**18).long(),
        (torch.randn(t, kv, d, generator=g) * 2.0**18).long(),
        torch.randint(-127, 128, (t, kv, d), generator=g, dtype=torch.int8),
    )
    return att


def _attention_outputs(att, ctx, t: int, use_kernel: bool, monkeypatch) -> torch.Tensor:
    """The pre-o_proj attention output (T, H, D) of IntAttention.attend for one step."""
    monkeypatch.setattr(integer_mod, "_use_kernel", lambda: use_kernel)
    q, k, v8 = att._test_qkv(t)
    q8, qa16, qsa = iops.quantize_rows(q)
    k8, ka16, ksa = iops.quantize_rows(k)
    return att.attend(q8, qa16, qsa, k8, ka16, ksa, v8, ctx)


@pytest.mark.parametrize("window", [None, 3])
def test_paged_context_kernel_equals_torch(window, monkeypatch):
    """IntegerPagedAttention: prefill chunks (one starting mid-sequence) then decode rows, kernel vs torch."""
    heads, kv, d, bs = 6, 2, 16, 4
    outs = {}
    for use_kernel in (True, False):
        att = _attention_module(heads, kv, d, window, seed=1)
        cache = IntKVCache(1, 16, bs, kv, d)
        cache.clear_blocks(list(range(16)))  # the engine zeroes each block the block manager hands out
        # step 1: seq A prefills 6 tokens (blocks 3, 7), seq B 5 tokens (blocks 1, 9)
        chunks = [PrefillChunk(0, 6, 0, torch.tensor([3, 7])), PrefillChunk(6, 5, 0, torch.tensor([1, 9]))]
        slots = torch.tensor([12, 13, 14, 15, 28, 29, 4, 5, 6, 7, 36])
        ctx = IntegerPagedAttention(cache, slots, None, chunks)
        res = [_attention_outputs(att, ctx, 11, use_kernel, monkeypatch)]
        # step 2: seq A decodes (pos 6), seq B prefills 4 more tokens from start_pos 5 (blocks 1, 9, 2)
        decode = DecodeRows(torch.tensor([4]), torch.tensor([6]), torch.tensor([3, 7]), torch.tensor([0, 0]),
                            torch.tensor([0, 4]))  # fmt: skip
        chunk = PrefillChunk(0, 4, 5, torch.tensor([1, 9, 2]))
        slots = torch.tensor([37, 38, 39, 8, 30])
        ctx = IntegerPagedAttention(cache, slots, decode, [chunk])
        res.append(_attention_outputs(att, ctx, 5, use_kernel, monkeypatch))
        # step 3: both decode (pos 7 and 9)
        decode = DecodeRows(torch.tensor([1, 0]), torch.tensor([7, 9]), torch.tensor([3, 7, 1, 9, 2]),
                            torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 4, 0, 4, 8]))  # fmt: skip
        ctx = IntegerPagedAttention(cache, torch.tensor([9, 31]), decode, [])
        res.append(_attention_outputs(att, ctx, 2, use_kernel, monkeypatch))
        outs[use_kernel] = res
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b)


def test_dense_context_kernel_equals_torch(monkeypatch):
    heads, kv, d = 4, 2, 16
    outs = {}
    for use_kernel in (True, False):
        att = _attention_module(heads, kv, d, None, seed=2)
        ctx = DenseIntContext()
        res = [_attention_outputs(att, ctx.step([(0, 5), (1, 3)]), 8, use_kernel, monkeypatch)]
        res.append(_attention_outputs(att, ctx.step([(1, 1), (0, 4)]), 5, use_kernel, monkeypatch))
        outs[use_kernel] = res
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b)


def test_disabled_kernel_falls_back():
    """DITTO_INT_DISABLE_KERNEL=1: the kernel reports why and IntAttention takes the torch path."""
    code = (
        "from ditto.numerics.kernels import integer_attention_c as k; from ditto.numerics import integer as m; "
        "print(k.kernel_available(), k.kernel_status(), m._use_kernel())"
    )
    env = dict(os.environ, DITTO_INT_DISABLE_KERNEL="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "disabled", "by", "DITTO_INT_DISABLE_KERNEL", "False"]
