"""The fused C float attention (engine/attention_c.py) against the torch paged-attention path."""

from __future__ import annotations

import pytest
import torch

from ditto.engine import attention_c
from ditto.engine.attention import DecodeRows, KVCache, PagedAttention, PrefillChunk

pytestmark = pytest.mark.skipif(not attention_c.kernel_available(), reason=attention_c.kernel_status())


def _setup(dtype, bs, d, hkv=2, g=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(1, 40, bs, hkv, d, dtype)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen).to(dtype))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen).to(dtype))
    perm = torch.randperm(40, generator=gen)
    return cache, perm, hkv * g, gen


def _decode(perm, positions, bs, tok_offset=0, starts=None):
    """Decode rows at `positions`, row i using blocks perm[starts[i] ...] (default 10 i)."""
    blocks, rows, first = [], [], []
    for i, p in enumerate(positions):
        nb = p // bs + 1
        at = 10 * i if starts is None else starts[i]
        blocks += perm[at : at + nb].tolist()
        rows += [i] * nb
        first += [j * bs for j in range(nb)]
    n = len(positions)
    return DecodeRows(
        torch.arange(tok_offset, tok_offset + n), torch.tensor(positions), torch.tensor(blocks),
        torch.tensor(rows), torch.tensor(first),
    )  # fmt: skip


def _attend(cache, decode, prefills, q, window, kernel: bool):
    ctx = PagedAttention(cache, torch.tensor([], dtype=torch.long), decode, prefills, 0.3, q.shape[1])
    ctx.cache.write = lambda *a: None  # the cache is already filled
    if not kernel:
        ctx._kernel_rows = ()
    out = ctx.attention(0, q, None, None, window)
    del ctx.cache.write
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bs", "d", "window"), [(16, 64, None), (4, 16, None), (16, 32, 5), (8, 256, 20)])
def test_kernel_matches_torch_path(dtype, bs, d, window):
    cache, perm, h, gen = _setup(dtype, bs, d)
    decode = _decode(perm, [0, 7, bs * 3 + 2], bs)
    prefills = [
        PrefillChunk(3, 5, 0, perm[30:31] if bs >= 5 else perm[30:32]),
        PrefillChunk(8, 4, 9, perm[32 : 32 + 13 // bs + 1]),
    ]
    q = torch.randn(12, h, d, generator=gen)
    got = _attend(cache, decode, prefills, q, window, kernel=True)
    ref = _attend(cache, decode, prefills, q, window, kernel=False)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), (got - ref).abs().max()


def test_row_bits_independent_of_batch_path_and_threads():
    """A query's bits are the same as a decode row alone, inside a batch, as the last token of a
    prefill chunk, and on 1 or 2 threads."""
    bs, d = 16, 64
    cache, perm, h, gen = _setup(torch.bfloat16, bs, d)
    q = torch.randn(6, h, d, generator=gen)
    pos = 37
    table = perm[: pos // bs + 1]
    alone = _attend(cache, _decode(perm, [pos], bs), [], q[:1], None, kernel=True)[0]
    busy = _attend(cache, _decode(perm, [5, pos, 20], bs, starts=[10, 0, 20]), [], q[[1, 0, 2]], None, kernel=True)[1]
    qp = torch.cat([q[3:6], q[:1]])  # a prefill chunk of 4 tokens ending at `pos`
    pre = _attend(cache, None, [PrefillChunk(0, 4, pos - 3, table)], qp, None, kernel=True)[3]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _attend(cache, _decode(perm, [pos], bs), [], q[:1], None, kernel=True)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, busy)
    assert torch.equal(alone, pre)
    assert torch.equal(alone, one)
