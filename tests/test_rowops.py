"""RMSNorm and RoPE in one C call (kernels/rowops.py): the contract's torch reference bit for bit,
Rotary's torch ops bit for bit, float64 within fp32 precision, and the same bits for a row whatever
the batch around it."""

from __future__ import annotations

import pytest
import torch
from kernel_build import use_portable_build

from ditto.models.layers import RMSNorm, Rotary
from ditto.numerics.kernels import rowops

pytestmark = pytest.mark.skipif(not rowops.kernel_available(), reason="no C compiler for the row kernels")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("d", [8, 64, 100, 256, 576, 640])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_is_the_contract(d, offset):
    x = torch.randn(7, d, generator=_gen(d)) * 3
    w = torch.randn(d, generator=_gen(d + 1))
    got = rowops.rmsnorm(x, w, offset, 1e-6)
    assert torch.equal(got, rowops.rmsnorm_reference(x, w, offset, 1e-6))
    x64 = x.double()
    want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + w.double())
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


def test_rmsnorm_row_does_not_depend_on_the_batch():
    x = torch.randn(64, 576, generator=_gen(0))
    w = torch.randn(576, generator=_gen(1))
    whole = rowops.rmsnorm(x, w, 0.0, 1e-5)
    perm = torch.randperm(64, generator=_gen(2))
    assert torch.equal(rowops.rmsnorm(x[perm], w, 0.0, 1e-5), whole[perm])
    for m in (1, 3, 17):
        assert torch.equal(rowops.rmsnorm(x[5 : 5 + m], w, 0.0, 1e-5), whole[5 : 5 + m])
    heads = x.view(64, 9, 64)  # (T, H, D): q/k norms normalise each head's D values
    wd = w[:64].contiguous()
    assert torch.equal(rowops.rmsnorm(heads, wd, 1.0, 1e-6)[3, 4], rowops.rmsnorm(heads[3, 4:5], wd, 1.0, 1e-6)[0])


def test_rmsnorm_differs_from_torch_only_by_the_sum_order():
    """Close to the model's RMSNorm (a different summation order may move the last bit), never far."""
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576, generator=_gen(3))
    x = torch.randn(32, 576, generator=_gen(4))
    torch.testing.assert_close(rowops.rmsnorm(x, norm.weight.data, 0.0, 1e-5), norm(x), rtol=1e-6, atol=1e-6)


def test_add_rmsnorm_is_the_add_then_the_norm():
    x = torch.randn(5, 576, generator=_gen(9))
    a = torch.randn(5, 576, generator=_gen(10))
    w = torch.randn(576, generator=_gen(11))
    s, y = rowops.add_rmsnorm(x, a, w, 0.0, 1e-5)
    assert torch.equal(s, x + a)
    assert torch.equal(y, rowops.rmsnorm(x + a, w, 0.0, 1e-5))


@pytest.mark.parametrize("d,heads", [(64, 9), (64, 3), (256, 4), (32, 1)])
def test_rope_equals_rotary_torch_ops(d, heads):
    rot = Rotary(d, 100000.0, None, 8192)
    x = torch.randn(13, heads, d, generator=_gen(d))
    pos = torch.tensor([0, 1, 2, 5, 9, 100, 101, 4000, 7, 7, 8191, 3, 64])
    cos, sin = rot.tables(int(pos.max()) + 1)
    want = rowops.rope_reference(x, pos, cos, sin)  # the torch ops
    assert torch.equal(rowops.rope(x, pos, cos, sin), want)
    assert torch.equal(rot(x, pos), want)  # Rotary runs the C call for fp32 on a CPU
    assert torch.equal(rot(x.double(), pos).float(), rowops.rope_reference(x.double(), pos, cos, sin).float())


def test_rope_reads_a_strided_view():
    """q and k arrive as column slices of the fused qkv output: the kernel reads them in place."""
    rot = Rotary(64, 10000.0, None, 2048)
    qkv = torch.randn(6, (9 + 3 + 3) * 64, generator=_gen(5))
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    q, k = q.view(6, 9, 64), k.view(6, 3, 64)
    pos = torch.arange(40, 46)
    assert not q.is_contiguous()
    cos, sin = rot.tables(46)
    assert torch.equal(rowops.rope(q, pos, cos, sin), rowops.rope_reference(q, pos, cos, sin))
    assert torch.equal(rowops.rope(k, pos, cos, sin), rowops.rope_reference(k, pos, cos, sin))


def test_portable_build_gives_the_same_bits(monkeypatch, tmp_path):
    x = torch.randn(5, 640, generator=_gen(6))
    w = torch.randn(640, generator=_gen(7))
    rot = Rotary(64, 10000.0, None, 512)
    q = torch.randn(5, 4, 64, generator=_gen(8))
    pos = torch.tensor([3, 1, 4, 1, 5])
    cos, sin = rot.tables(6)
    native = rowops.rmsnorm(x, w, 1.0, 1e-6), rowops.rope(q, pos, cos, sin)
    use_portable_build(monkeypatch, tmp_path, rowops)
    assert torch.equal(rowops.rmsnorm(x, w, 1.0, 1e-6), native[0])
    assert torch.equal(rowops.rope(q, pos, cos, sin), native[1])
