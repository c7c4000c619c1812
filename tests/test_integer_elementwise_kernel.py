"""The fused C elementwise kernels of the integer mode are bit-exact with the torch reference ops
(quantize_rows, the linear epilogues, the MLP chain, IntRMSNorm, q/k norm + RoPE + quantisation, the
P.V requantisation) on random and extreme inputs, with any thread count and without -march=native;
whole integer models give the same logits on both paths, and the torch path runs when disabled."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from kernel_build import use_portable_build
from test_integer_mode import calibrated, int_logits

from ditto.numerics import integer as integer_mod
from ditto.numerics.kernels import integer_elementwise_c as kern
from ditto.numerics.kernels import integer_ops as iops

pytestmark = [
    pytest.mark.skipif(not kern.kernel_available(), reason=f"kernel: {kern.kernel_status()}"),
    pytest.mark.usefixtures("no_bound_checks"),
]

I31 = (1 << 31) - 1


def ints(shape: tuple[int, ...], bits: int, g: torch.Generator, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Random ints |x| < 2^bits with per-row magnitudes spread over 12 octaves, plus extreme rows."""
    mag = torch.randint(max(bits - 12, 0), bits + 1, (*shape[:-1], 1), generator=g).double()
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * 2.0**mag
    x = x.round().clamp(-(2.0**bits) + 1, 2.0**bits - 1).long()
    flat = x.view(-1, shape[-1])
    if flat.shape[0] >= 4:
        flat[0] = 0  # a row of zeros
        flat[1] = (1 << bits) - 1  # the largest magnitude everywhere
        flat[2, ::2] = -((1 << bits) - 1)
        flat[3] = torch.randint(-2, 3, (shape[-1],), generator=g)  # tiny values
    return x.to(dtype)


def assert_same(got: tuple | torch.Tensor, ref: tuple | torch.Tensor) -> None:
    got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- quantize_rows
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (7, 64), (33, 576), (2, 3, 64)])
@pytest.mark.parametrize("bits", [0, 8, 20, 31])
def test_quantize_rows_int32(shape, bits):
    x = ints(shape, bits, torch.Generator().manual_seed(bits * 100 + shape[-1]), torch.int32)
    if bits == 31 and x.numel() > 2:
        x.view(-1)[1] = -(1 << 31)  # int32 minimum: |x| = 2^31
    assert_same(kern.quantize_rows(x), iops.quantize_rows(x))


@pytest.mark.parametrize("bits", [31, 40, 50, 62])
def test_quantize_rows_int64_wide(bits):
    """Beyond the checked |x| < 2^31: shifts past 63, products that wrap, int64 extremes."""
    x = ints((9, 100), bits, torch.Generator().manual_seed(bits))
    x[4, 0] = -(1 << 63)
    x[5, 7] = (1 << 63) - 1
    assert_same(kern.quantize_rows(x), iops.quantize_rows(x))


def test_quantize_rows_strided_input():
    x = ints((6, 40), 30, torch.Generator().manual_seed(3), torch.int32)
    assert_same(kern.quantize_rows(x[:, 5:29]), iops.quantize_rows(x[:, 5:29]))  # column slice: row stride 40


# ----------------------------------------------------------------------------- linear epilogue
def torch_epilogue(acc, a16, sa, parts) -> torch.Tensor:
    """IntLinear.epilogue per part, concatenated, then .to(int32) (IntLinear.forward)."""
    outs, c = [], 0
    for m, bias, shift, limit in parts:
        lin = SimpleNamespace(m=m, bias=bias, shift=shift, limit=limit)
        outs.append(integer_mod.IntLinear.epilogue(lin, acc[:, c : c + len(m)], a16, sa))
        c += len(m)
    return torch.cat(outs, dim=1).to(torch.int32)


def epilogue_case(t: int, sizes: list[int], g: torch.Generator, wild: bool):
    n = sum(sizes)
    acc = torch.randint(-576 * 127**2, 576 * 127**2 + 1, (t, n), generator=g, dtype=torch.int32)
    acc[0] = 0
    if t > 2:
        acc[1, : n // 2] = I31
        acc[2, : n // 2] = -I31 - 1
    a16 = torch.randint(1, (1 << 15) + 2, (t, 1), generator=g)
    sa = torch.randint(0, 18, (t, 1), generator=g)
    if wild:  # sa > shift (negative shifts) and products that wrap
        sa[: t // 2] = torch.randint(-70, 90, (t // 2, 1), generator=g)
    parts = []
    for j, size in enumerate(sizes):
        m = torch.randint(-(1 << 18), 1 << 18, (size,), generator=g)
        bias = torch.randint(-(1 << 29), 1 << 29, (size,), generator=g) if j % 2 == 0 else None
        parts.append((m, bias, int(torch.randint(17, 63, (1,), generator=g)), [1 << 30, 128, 1 << 24, 1 << 31][j % 4]))
    return acc, a16, sa, parts


@pytest.mark.parametrize("sizes", [[1], [7], [600], [64, 16, 16], [513, 1, 1030], [5, 5, 5, 5]])
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("wild", [False, True])
def test_linear_epilogue(sizes, t, wild):
    acc, a16, sa, parts = epilogue_case(t, sizes, torch.Generator().manual_seed(sum(sizes) + t), wild)
    got = kern.linear_epilogue(acc, a16, sa, kern.EpilogueParams.build(parts))
    assert_same(got, torch_epilogue(acc, a16, sa, parts))


def test_linear_epilogue_float_logits():
    """IntLMHead: float32 logit_int * 2^-frac, exactly `forward_int(x).float() * 2^-frac`."""
    acc, a16, sa, parts = epilogue_case(5, [1000], torch.Generator().manual_seed(9), False)
    parts = [(parts[0][0], None, parts[0][2], 1 << 24)]
    for frac in (-3, 0, 13, 24):
        got = kern.linear_epilogue(acc, a16, sa, kern.EpilogueParams.build(parts), 2.0**-frac)
        lin = SimpleNamespace(m=parts[0][0], bias=None, shift=parts[0][2], limit=1 << 24)
        ref = integer_mod.IntLinear.epilogue(lin, acc, a16, sa).float() * 2.0**-frac
        assert_same(got, ref)


def test_epilogue_params_reject_wide_limits():
    with pytest.raises(ValueError):
        kern.EpilogueParams.build([(torch.ones(3, dtype=torch.long), None, 20, (1 << 31) + 1)])


# ----------------------------------------------------------------------------- MLP
def torch_mlp(acc, a16, sa, parts, act: str, fg: int, shift: int, hlim: int, quantize: bool = True):
    """IntMLP.forward from the fused GEMM output to down_proj's quantize_rows (or its input h)."""
    n = len(parts[0][0])
    gate = integer_mod.IntLinear.epilogue(SimpleNamespace(m=parts[0][0], bias=parts[0][1], shift=parts[0][2],
                                                          limit=parts[0][3]), acc[:, :n], a16, sa)  # fmt: skip
    up = integer_mod.IntLinear.epilogue(SimpleNamespace(m=parts[1][0], bias=parts[1][1], shift=parts[1][2],
                                                        limit=parts[1][3]), acc[:, n:], a16, sa)  # fmt: skip
    fn = iops.silu_int if act == "silu" else iops.gelu_tanh_int
    prod = fn(gate, fg).mul_(up)
    h = iops.rshift_round(prod, shift) if shift >= 0 else prod << -shift
    h = h.clamp_(-hlim, hlim)
    return iops.quantize_rows(h) if quantize else h


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("fg,shift", [(0, 0), (9, 20), (14, 17), (24, 30), (20, -3), (3, 62), (17, -62)])
@pytest.mark.parametrize("t,i", [(1, 8), (6, 128), (19, 1536)])
def test_mlp_act_quantize(act, fg, shift, t, i):
    g = torch.Generator().manual_seed(fg * 7 + i + t)
    acc, a16, sa, _ = epilogue_case(t, [2 * i], g, wild=False)
    gate_m = torch.randint(-(1 << 18), 1 << 18, (i,), generator=g)
    up_m = torch.randint(-(1 << 18), 1 << 18, (i,), generator=g)
    bias = torch.randint(-(1 << 20), 1 << 20, (i,), generator=g) if t == 6 else None  # IntMLP has none; general
    parts = [(gate_m, None, 40, 1 << 30), (up_m, bias, 44, 1 << 30)]
    params = kern.MLPParams.build(kern.EpilogueParams.build(parts), act != "silu", fg, shift, (1 << 30) - 1)
    got = kern.mlp_act_quantize(acc, a16, sa, params)
    assert_same(got, torch_mlp(acc, a16, sa, parts, act, fg, shift, (1 << 30) - 1))
    raw = kern.mlp_act_quantize(acc, a16, sa, params, quantize=False)
    assert_same(raw, torch_mlp(acc, a16, sa, parts, act, fg, shift, (1 << 30) - 1, quantize=False))


# Q24 gates whose exp(-|x|) (Q30) is one of the few e where sigmoid's double quotient
# (2^60 + d/2) / d, d = e + 2^30, is off by one before the kernel's exact remainder fix-up.
FIXUP_X = [93438165, 71903593, 62690805, 53799547, 51794046, 47731687, 43793085, 38083442, 26178620, 18201450]


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("fg", [0, 10, 24])
def test_activation_sweep(act, fg):
    """act(gate) * 1 on a dense grid of gate values around 0 and the tails, compared before quantisation:
    the exp table, both sigmoid halves, the division fix-up and gelu's clamp at +-16 are all reached."""
    step = max(1, (80 << fg) // 50000)
    grid = torch.cat([torch.arange(-(40 << fg) - 3, (40 << fg) + 4, step),
                      torch.tensor([(1 << 30) - 1, -(1 << 30) + 1, 0, 1, -1, 1 << 29])])  # fmt: skip
    if fg == 24:
        grid = torch.cat([grid, torch.tensor(FIXUP_X), -torch.tensor(FIXUP_X)])
    n = grid.numel()
    acc = torch.cat([grid, torch.ones(n, dtype=torch.long)]).to(torch.int32)[None]  # (1, 2n): gate | up = 1
    a16, sa = torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
    ones = torch.ones(n, dtype=torch.long)
    parts = [(ones, None, 0, 1 << 30), (ones, None, 0, 1 << 30)]
    params = kern.MLPParams.build(kern.EpilogueParams.build(parts), act != "silu", fg, 0, (1 << 30) - 1)
    got = kern.mlp_act_quantize(acc, a16, sa, params, quantize=False)
    fn = iops.silu_int if act == "silu" else iops.gelu_tanh_int
    assert_same(got, fn(grid, fg)[None])
    assert_same(kern.sigmoid(grid, fg), iops.sigmoid_int(grid, fg))


# ----------------------------------------------------------------------------- RMSNorm
def torch_rmsnorm(x, gm, ge, eps_int, oshift) -> torch.Tensor:
    y = iops.rmsnorm_int(x, gm, ge, eps_int)
    y = y << oshift if oshift >= 0 else iops.rshift_round(y, -oshift)
    return y.to(torch.int32)


@pytest.mark.parametrize("d", [1, 3, 16, 64, 576, 1000])
@pytest.mark.parametrize("bits", [4, 24, 31])
@pytest.mark.parametrize("oshift", [-7, 0, 3])
def test_rmsnorm(d, bits, oshift):
    g = torch.Generator().manual_seed(d * 3 + bits + oshift)
    x = ints((9, d), bits, g, torch.int32)
    if bits == 31:
        x[5, 0] = -(1 << 31)
    gm = torch.randint(-(1 << 23), 1 << 23, (d,), generator=g)
    for ge, eps_int in [(20, 0), (5, 1), (23, 1 << 40), (22, (1 << 62) // d), (62, 3)]:
        params = kern.NormParams.build(gm, ge, eps_int, oshift)
        assert_same(kern.rmsnorm(x, params), torch_rmsnorm(x, gm, ge, eps_int, oshift))
    assert_same(kern.rmsnorm(x.view(3, 3, d), params), torch_rmsnorm(x, gm, ge, eps_int, oshift).view(3, 3, d))


# ----------------------------------------------------------------------------- attention heads
def rope_tables(d: int, positions: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return iops.rope_tables(inv_freq, positions, 14)


@pytest.mark.parametrize("heads,d", [(1, 2), (4, 16), (9, 64), (3, 128)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("bits", [12, 30, 31])
def test_head_post(heads, d, norm, bits):
    """(norm) -> rope_int -> quantize_rows per head, from a column slice of a fused q|k|v output."""
    g = torch.Generator().manual_seed(heads * d + bits + norm)
    t = 11
    wide = ints((t, (heads + 3) * d), bits, g, torch.int32)  # (T, N): q | other columns
    x = wide[:, d : (heads + 1) * d].view(t, heads, d)  # (T, H, D), row stride (heads + 3) * d
    cos, sin = rope_tables(d)
    positions = torch.randint(0, 300, (t,), generator=g)
    positions[0], positions[1] = 0, 299
    params, ref_in = None, x
    if norm:
        gm = torch.randint(-(1 << 23), 1 << 23, (d,), generator=g)
        params = kern.NormParams.build(gm, 30, 7, -2)
        ref_in = torch_rmsnorm(x, gm, 30, 7, -2)
    rope = iops.rope_int(ref_in, positions, cos, sin, 14)
    tables = cos.contiguous(), sin.contiguous()
    assert_same(kern.head_post(x, params, positions, *tables, 14, quantize=False), rope)
    assert_same(kern.head_post(x, params, positions, *tables, 14), iops.quantize_rows(rope))


def test_head_post_rejects_positions_past_the_table():
    cos, sin = rope_tables(8, 10)
    with pytest.raises(ValueError):
        kern.head_post(torch.zeros(2, 1, 8, dtype=torch.int32), None, torch.tensor([3, 10]), cos, sin)


@pytest.mark.parametrize("t,n", [(1, 16), (5, 576), (13, 200)])
def test_requant_quantize(t, n):
    g = torch.Generator().manual_seed(t + n)
    o = ints((t, n), 40, g)
    m = torch.randint(1 << 23, 1 << 24, (n,), generator=g)
    e = torch.randint(20, 70, (n,), generator=g)  # some shifts past 63
    e[0] = -1
    lim = 1 << 30
    ref = iops.requantise(o, m, e).clamp_(-lim + 1, lim - 1)
    assert_same(kern.requant_quantize(o, m, e, lim, quantize=False), ref)
    assert_same(kern.requant_quantize(o, m, e, lim), iops.quantize_rows(ref))


# ----------------------------------------------------------------------------- threads, builds, fallback
def _all_kernels(g: torch.Generator) -> list[torch.Tensor]:
    """One call of every kernel on inputs large enough to split over threads."""
    out = []
    x = ints((37, 576), 30, g, torch.int32)
    out += kern.quantize_rows(x)
    acc, a16, sa, parts = epilogue_case(37, [1100, 300], g, wild=True)
    out.append(kern.linear_epilogue(acc, a16, sa, kern.EpilogueParams.build(parts)))
    acc, a16, sa, _ = epilogue_case(37, [2 * 700], g, wild=False)
    mparts = [(torch.randint(-(1 << 18), 1 << 18, (700,), generator=g), None, 40, 1 << 30)] * 2
    for gelu in (False, True):
        out += kern.mlp_act_quantize(acc, a16, sa, kern.MLPParams.build(kern.EpilogueParams.build(mparts), gelu, 12, 5,
                                                                         (1 << 30) - 1))  # fmt: skip
    gm = torch.randint(-(1 << 23), 1 << 23, (64,), generator=g)
    out.append(kern.rmsnorm(x.view(-1, 64), kern.NormParams.build(gm, 30, 3, 1)))
    cos, sin = rope_tables(64)
    out += kern.head_post(x.view(37, 9, 64), kern.NormParams.build(gm, 30, 3, -1), torch.arange(37), cos, sin)
    out += kern.requant_quantize(x.long() << 8, (gm.abs() + 1).repeat(9), torch.full((64,), 30).repeat(9), 1 << 30)
    return out


def _reference_all(g: torch.Generator) -> list[torch.Tensor]:
    """The torch twins of `_all_kernels`, on the same inputs (same generator sequence)."""
    out = []
    x = ints((37, 576), 30, g, torch.int32)
    out += iops.quantize_rows(x)
    acc, a16, sa, parts = epilogue_case(37, [1100, 300], g, wild=True)
    out.append(torch_epilogue(acc, a16, sa, parts))
    acc, a16, sa, _ = epilogue_case(37, [2 * 700], g, wild=False)
    mparts = [(torch.randint(-(1 << 18), 1 << 18, (700,), generator=g), None, 40, 1 << 30)] * 2
    for act in ("silu", "gelu_tanh"):
        out += torch_mlp(acc, a16, sa, mparts, act, 12, 5, (1 << 30) - 1)
    gm = torch.randint(-(1 << 23), 1 << 23, (64,), generator=g)
    out.append(torch_rmsnorm(x.view(-1, 64), gm, 30, 3, 1))
    cos, sin = rope_tables(64)
    out += iops.quantize_rows(
        iops.rope_int(torch_rmsnorm(x.view(37, 9, 64), gm, 30, 3, -1), torch.arange(37), cos, sin)
    )
    lim = 1 << 30
    o = iops.requantise(x.long() << 8, (gm.abs() + 1).repeat(9), torch.full((64,), 30).repeat(9)).clamp_(
        -lim + 1, lim - 1
    )
    out += iops.quantize_rows(o)
    return out


def test_threads_agree():
    ref = _reference_all(torch.Generator().manual_seed(21))
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            got = _all_kernels(torch.Generator().manual_seed(21))
            for a, b in zip(got, ref, strict=True):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def test_portable_build_equals_torch(monkeypatch, tmp_path):
    """Built without -march=native the kernels give the same bits."""
    use_portable_build(monkeypatch, tmp_path, kern)
    got = _all_kernels(torch.Generator().manual_seed(4))
    for a, b in zip(got, _reference_all(torch.Generator().manual_seed(4)), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def int_model(request):
    return calibrated(request.param)[1]


@pytest.mark.parametrize("attention_kernel", [True, False])
def test_model_kernels_equal_torch(int_model, attention_kernel, monkeypatch):
    """Prefill of several sequences and a decode step: the same logits with and without the kernels
    (with the attention kernel, or the torch attention on the kernels' q8 / k8 / v8)."""
    g = torch.Generator().manual_seed(13)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 17, 4)]
    outs = {}
    for use in (True, False):
        monkeypatch.setattr(integer_mod, "_use_elementwise", lambda x, use=use: use)
        monkeypatch.setattr(integer_mod, "_use_kernel", lambda use=use: use and attention_kernel)
        ctx = integer_mod.DenseIntContext()
        res = int_logits(int_model, seqs, ctx)
        ctx.step([(0, 1), (2, 1)])
        ids, pos = torch.tensor([5, 6]), torch.tensor([9, 4])
        with torch.inference_mode():
            res.append(int_model.compute_logits(int_model(ids, pos, ctx)))
        outs[use] = res
    for a, b in zip(outs[True], outs[False], strict=True):
        assert torch.equal(a, b)


def test_kernels_used_by_the_model(int_model, monkeypatch):
    """The model's forward really runs the kernel path (no torch quantize_rows / rope / activation / epilogue)."""
    ids = torch.tensor([1, 2, 3, 4])
    emb = int_model.embed(ids)  # the embedding's own requantise stays in torch
    monkeypatch.setattr(integer_mod, "_use_elementwise", lambda x: True)
    monkeypatch.setattr(integer_mod.IntEmbedding, "forward", lambda self, i: emb)
    for name in ("quantize_rows", "rope_int", "rmsnorm_int", "silu_int", "gelu_tanh_int", "requantise"):
        monkeypatch.setattr(iops, name, lambda *a, name=name: pytest.fail(f"torch {name} called"))
    monkeypatch.setattr(integer_mod.IntLinear, "epilogue", lambda *a: pytest.fail("torch epilogue called"))
    int_logits(int_model, [ids.tolist()])


@pytest.mark.parametrize("env", ["DITTO_INT_DISABLE_ELEMENTWISE", "DITTO_INT_DISABLE_KERNEL"])
def test_disabled_kernels_fall_back(env):
    """Either variable: the kernels report why, and the model takes the torch path."""
    code = (
        "import torch; from ditto.numerics.kernels import integer_elementwise_c as k; "
        "from ditto.numerics import integer as m; "
        "print(k.kernel_available(), m._use_elementwise(torch.zeros(1)), k.kernel_status())"
    )
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", **{env: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env_vars, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "disabled", "by", env]


@pytest.mark.parametrize("scales", ["none", "col", "row", "both"])
def test_weight_quantisation_is_torchs(scales, monkeypatch):
    """integer_mod.quant_weight and _col_absmax through the C pass give the torch ops' bits (the integers of
    the integer model must not depend on whether a compiler was there): weights of several magnitudes,
    a zero row, exact halves after scaling, SmoothQuant-like column and row factors."""
    if not kern.kernel_available():
        pytest.skip(kern.kernel_status())
    g = torch.Generator().manual_seed(len(scales))
    w = torch.randn(97, 203, generator=g) * torch.logspace(-4, 1, 97)[:, None]
    w[3] = 0.0
    w[5, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 127.0, -127.0, 63.5])  # ties for rint
    col = torch.rand(203, generator=g, dtype=torch.float64) * 4 + 0.1 if scales in ("col", "both") else None
    row = torch.rand(97, generator=g, dtype=torch.float64) * 4 + 0.1 if scales in ("row", "both") else None
    fast = integer_mod.quant_weight(w, col, row), integer_mod._col_absmax(w)
    monkeypatch.setattr(kern, "quant_weight", lambda *a: None)
    monkeypatch.setattr(kern, "col_absmax", lambda *a: None)
    slow = integer_mod.quant_weight(w, col, row), integer_mod._col_absmax(w)
    assert torch.equal(fast[0][0], slow[0][0]) and torch.equal(fast[0][1], slow[0][1])
    assert torch.equal(fast[1], slow[1])
    assert fast[0][0].dtype == torch.int8 and fast[0][1].dtype == torch.float64
    assert int(fast[0][0].abs().max()) == 127


def test_weight_quantisation_of_non_finite_weights_falls_back():
    w = torch.randn(4, 16)
    w[2, 3] = float("nan")
    assert kern.quant_weight(w) is None  # the caller runs torch's ops (its result, NaN or not)
