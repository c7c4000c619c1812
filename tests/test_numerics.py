"""Numerics modes: quantiser error bounds, exact kernels, LLM.int8 outlier split, mode application."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ditto.config import EngineConfig, ModelConfig
from ditto.engine.attention import KVCache
from ditto.models import decoder as decoder_module
from ditto.models import layers as layers_module
from ditto.models.decoder import Decoder
from ditto.numerics import quant
from ditto.numerics.base import CastEmbedding, NumericsMode, get_mode, list_modes, register
from ditto.numerics.kernels.batch_invariant import kernel_available
from ditto.numerics.layercast import LayerCastLinear, PackedLayerCastLinear
from ditto.numerics.llm_int8 import LLMInt8Linear, llm_int8_matmul
from ditto.numerics.mxint8 import MXInt8Linear
from ditto.numerics.w4 import W4Linear
from ditto.numerics.w8a8 import Int8Linear

ALL_MODES = ["fp32", "bf16", "fp16", "layercast", "int8", "w8a8", "w4", "w4-g128", "w4-asym", "w4-g128-asym", "mxint8"]
FP32_EPS = 2.0**-24


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- registry


def test_registry_lists_and_rejects():
    names = list_modes()
    for n in ALL_MODES:
        assert n in names
        assert get_mode(n).name == n
    with pytest.raises(ValueError, match="available: .*fp32"):
        get_mode("fp8")
    with pytest.raises(ValueError, match="already registered"):
        register(get_mode("fp32"))
    mode = get_mode("bf16")
    assert isinstance(mode, NumericsMode)
    assert mode.act_dtype == torch.bfloat16 and mode.kv_dtype == "bf16"
    with pytest.raises(Exception):  # frozen dataclass  # noqa: B017
        mode.name = "x"
    integer = get_mode("integer")  # registered like the others; calibrated per model, so no bare apply
    assert list_modes()[-1] == "integer" and integer.kv_dtype == "int8" and integer.act_dtype == torch.int32
    with pytest.raises(ValueError, match="calibrated"):
        integer.apply(nn.Linear(4, 4))


# ---------------------------------------------------------------- quantiser round trips


@pytest.mark.parametrize("dim", [0, 1])
def test_int8_symmetric_bound(dim):
    x = torch.randn(64, 96, generator=_gen(1)) * torch.logspace(-3, 2, 96)
    x[3] = 0.0  # all-zero slice
    q, s = quant.quantize_int8_symmetric(x, dim=dim)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (x - quant.dequantize_int8(q, s)).abs()
    assert torch.all(err <= s / 2 + 127 * FP32_EPS * s)
    # the largest element of each slice is hit exactly (up to fp rounding of the scale)
    assert torch.all(q.abs().amax(dim=dim) <= 127)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_groupwise_bound(group, symmetric):
    w = torch.randn(96, 256, generator=_gen(2)) * 0.05
    w[:, :group] += 0.3  # an offset group (asymmetric helps there)
    w[5, group : 2 * group] = 0.0  # an all-zero group
    w[6, group : 2 * group] = 0.125  # a constant group
    q, s, z = quant.quantize_int4_groupwise(w, group, symmetric)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert s.dtype == torch.bfloat16 and z.dtype == torch.bfloat16
    deq = quant.dequantize_int4_groupwise(q, s, z, group)
    sf = s.float().repeat_interleave(group, 1)
    bound = sf / 2
    if symmetric:
        assert torch.all(z == 0)
    else:
        g = w.reshape(96, -1, group)
        zero_err = (z.float() - (g.amin(-1) + 8 * s.float())).abs().repeat_interleave(group, 1)
        bound = bound + zero_err
    err = (w - deq).abs()
    assert torch.all(err <= bound * (1 + 1e-6) + 1e-12)
    # pack / unpack, both layouts
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q)), q)
    assert quant.pack_int4(q).shape == (96, 128)
    if quant.int4_cpu_kernel_available():
        q128 = torch.cat([q, q.flip(0)[:32]])  # 128 rows: two blocks of 64
        p = quant.pack_int4_tinygemm_cpu(q128)
        assert p.shape == (128, 128)
        assert torch.equal(quant.unpack_int4_tinygemm_cpu(p), q128)


def test_mxint8_bound():
    x = torch.randn(16, 256, generator=_gen(3)) * torch.logspace(-4, 3, 256)
    x[2, :32] = 0.0
    x[3, 32:64] = 1.99  # near the saturation edge
    q, e = quant.quantize_mxint8(x)
    assert q.shape == x.shape and e.shape == (16, 8)
    deq = quant.dequantize_mxint8(q, e)
    step = torch.exp2(e.float() - 6).repeat_interleave(32, 1)
    err = (x - deq).abs()
    assert torch.all(err <= step)  # all elements (the block max may saturate)
    unsat = q.abs() < 127
    assert torch.all(err[unsat] <= step[unsat] / 2)
    # scale is a power of two: the block max lies in [64, 128) * step
    amax = x.reshape(16, 8, 32).abs().amax(-1)
    nz = amax > 0
    ratio = amax[nz] / torch.exp2(e.float()[nz])
    assert torch.all((ratio >= 1) & (ratio < 2))
    assert torch.equal(deq[2, :32], torch.zeros(32))


def test_kv_int8_round_trip_and_knob():
    k = torch.randn(7, 3, 16, generator=_gen(4)) * 3  # (T, Hkv, D)
    slots, blocks = torch.arange(7), torch.tensor([0, 1])

    def rows(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        kt, v = cache.read(0, blocks)  # K^T (nb, Hkv, D, bs), V (nb, Hkv, bs, D)
        return kt.permute(0, 3, 1, 2).reshape(8, 3, 16)[:7], v.permute(0, 2, 1, 3).reshape(8, 3, 16)[:7]  # (T, Hkv, D)

    q8 = KVCache(1, 2, 4, 3, 16, torch.int8)  # 1 layer, 2 blocks of 4 slots
    q8.write(0, slots, k, k)
    back_k, back_v = rows(q8)
    s = k.abs().amax(-1, keepdim=True) / 127  # one scale per (token, head)
    assert torch.equal(back_k, back_v) and torch.all((k - back_v).abs() <= s / 2 + 127 * FP32_EPS * s)
    bf = KVCache(1, 2, 4, 3, 16, torch.bfloat16)
    bf.write(0, slots, k, k)
    assert bf.v[0].dtype == torch.bfloat16 and torch.equal(rows(bf)[1], k.bfloat16().float())
    assert get_mode("bf16").kv_dtype == "bf16" and EngineConfig(kv_dtype="int8").kv_dtype == "int8"
    with pytest.raises(ValueError):
        EngineConfig(kv_dtype="fp8")
    assert KVCache.bytes_per_token(1, 3, 64, torch.int8) == 2 * 3 * (64 + 4)
    assert KVCache.bytes_per_token(1, 3, 64, torch.float32) == 2 * 3 * 64 * 4


# ---------------------------------------------------------------- exact kernels


def _grid_weight(n, k, qmax, gen, scale_exp):
    """Integer weights in [-qmax, qmax] with qmax hit in every row, times 2**scale_exp."""
    q = torch.randint(-qmax, qmax + 1, (n, k), generator=gen).float()
    q[:, 0] = qmax
    return q * 2.0**scale_exp


def test_w8a8_exact_on_grid():
    g = _gen(5)
    w = _grid_weight(48, 64, 127, g, -3)  # per-channel scale exactly 2**-3
    x = _grid_weight(9, 64, 127, g, -5)  # per-token scale exactly 2**-5
    lin = nn.Linear(64, 48, bias=False)
    lin.weight.data = w
    ql = Int8Linear.from_linear(lin)
    assert torch.equal(ql.w_scale, torch.full((48,), 2.0**-3))
    assert torch.equal(ql.dequantized_weight(), w)
    y = ql(x)
    ref = (x.double() @ w.double().t()).float()  # |acc| < 2**24: exactly representable
    assert torch.equal(y, ref)


def test_w4_exact_on_grid():
    g = _gen(6)
    k, n = 64, 128
    q = torch.randint(-7, 8, (n, k), generator=g).float()
    q[:, ::32] = 7  # every group's max hits 7 -> scale exactly 1 (then * 2**-2)
    w = q * 0.25
    x = torch.randint(-1, 2, (5, k), generator=g).float()  # outputs |y| <= 64*8/4: exact in bf16
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data = w
    ref = (x.double() @ w.double().t()).float()
    backends = ["dequant"] + (["tinygemm"] if quant.int4_cpu_kernel_available() else [])
    for backend in backends:
        wl = W4Linear(lin, group_size=32, symmetric=True, backend=backend)
        assert torch.equal(wl.dequantized_weight(), w), backend
        assert torch.equal(wl(x), ref), backend


def test_w4_padding_paths_match_dequant():
    # K=96 with group 128 (pads K), N=80 (pads rows for the kernel), with bias
    lin = nn.Linear(96, 80)
    x = torch.randn(3, 96, generator=_gen(7))
    for symmetric in (True, False):
        ref_l = W4Linear(lin, 128, symmetric, backend="dequant")
        y_ref = ref_l(x)
        expect = F.linear(x, ref_l.dequantized_weight(), lin.bias.detach())
        torch.testing.assert_close(y_ref, expect)
        if quant.int4_cpu_kernel_available():
            kl = W4Linear(lin, 128, symmetric, backend="tinygemm")
            assert torch.equal(kl.dequantized_weight(), ref_l.dequantized_weight())
            # the kernel rounds its input and output to bf16
            torch.testing.assert_close(kl(x), y_ref, atol=0.02, rtol=0.01)


def _mxint8_gemm_exact(
    qx: torch.Tensor, ex: torch.Tensor, qw: torch.Tensor, ew: torch.Tensor, block: int = quant.MX_BLOCK
) -> torch.Tensor:
    """Block-exact MXINT8 product: per block an int32 dot product (exact), times 2**(ex+ew-12)
    (exact), summed over blocks in float32 (the only rounding). qx (M, K), ex (M, K/B),
    qw (N, K), ew (N, K/B) -> float32 (M, N). Reference for MXInt8Linear's dequantising fast path."""
    m, k = qx.shape
    n = qw.shape[0]
    nb = k // block
    out = torch.zeros(m, n, dtype=torch.float32, device=qx.device)
    for b in range(nb):
        sl = slice(b * block, (b + 1) * block)
        acc = quant.int_mm(qx[:, sl].contiguous(), qw[:, sl].t()).float()
        shift = ex[:, b].float().unsqueeze(1) + ew[:, b].float().unsqueeze(0) - 2 * quant.MX_ELEM_FRAC_BITS
        out += acc * torch.exp2(shift)
    return out


def test_mxint8_exact_on_grid():
    g = _gen(8)
    k, n = 96, 40
    # weights: int8 with the block max in [64, 128) -> per-block exponent 0 -> step 2**-6
    qw = torch.randint(-127, 128, (n, k), generator=g).float()
    qw[:, ::32] = 100
    w = qw * 2.0**-6
    qx = torch.randint(-127, 128, (4, k), generator=g).float()
    qx[:, ::32] = -90
    x = qx * 2.0**-3  # exponent 3, step 2**-3
    qwi, ew = quant.quantize_mxint8(w)
    assert torch.equal(qwi.float(), qw) and torch.all(ew == 0)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data = w
    ml = MXInt8Linear(lin)
    ref = (x.double() @ w.double().t()).float()
    assert torch.equal(ml(x), ref)
    qxi, ex = quant.quantize_mxint8(x)
    assert torch.equal(_mxint8_gemm_exact(qxi, ex, qwi, ew), ref)
    # random (off-grid) data: fast path == blockwise exact path up to fp32 summation order
    xr, wr = torch.randn(4, k, generator=g), torch.randn(n, k, generator=g)
    a, b = quant.quantize_mxint8(xr), quant.quantize_mxint8(wr)
    fast = F.linear(quant.dequantize_mxint8(*a), quant.dequantize_mxint8(*b))
    torch.testing.assert_close(fast, _mxint8_gemm_exact(*a, *b), atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------- LLM.int8


def test_llm_int8_outlier_split_exact():
    g = _gen(9)
    k, n = 8, 4
    # weights with per-row absmax 127 * 2**-7 -> scale exactly 2**-7, values on the grid
    w = _grid_weight(n, k, 127, g, -7)
    # activations: column 2 holds a 7.0 (outlier); the rest lie on the grid q/32 with |q| <= 127
    # and one 127/32 per row, so the row scale (computed without column 2) is exactly 1/32
    qx = torch.randint(-127, 128, (3, k), generator=g).float()
    qx[:, 5] = 127
    x = qx / 32
    x[0, 2] = 7.0
    x[1, 2] = -0.5  # the whole column goes through the float path, including small entries
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data = w
    ll = LLMInt8Linear.from_linear(lin)
    y = ll(x)
    # hand computation: int path on columns != 2, float path on column 2
    keep = [c for c in range(k) if c != 2]
    acc = qx[:, keep].double() @ (w[:, keep] * 128).double().t()  # int32 accumulator
    hand = acc * (1 / 32) * (1 / 128) + x[:, 2:3].double() @ w[:, 2:3].double().t()
    assert torch.equal(y, hand.float())
    assert torch.equal(y, (x.double() @ w.double().t()).float())  # all products exact here
    # without the split (threshold above 7) the 7.0 sets row 0's scale and the result changes
    y_noout = llm_int8_matmul(x, ll.q_weight, ll.w_scale, threshold=100.0)
    assert not torch.equal(y_noout[0], y[0])
    # with no outliers LLM.int8 reduces to W8A8
    x_small = x.clone()
    x_small[0, 2] = 1.0
    assert torch.equal(ll(x_small), Int8Linear.from_linear(lin)(x_small))


# ---------------------------------------------------------------- modes on an MLP and a tiny model

# max |y - y_fp32| / max |y_fp32|; the MLP input has an outlier feature (x10), which costs w8a8
# (~3.4e-2) and which LLM.int8 routes through fp (~1.3e-2)
MLP_TOL = {
    "fp32": 0.0,
    "bf16": 2e-2,
    "fp16": 3e-3,
    "layercast": 1e-2,
    "int8": 2e-2,
    "w8a8": 5e-2,
    "w4": 0.15,
    "w4-g128": 0.2,
    "w4-asym": 0.15,
    "w4-g128-asym": 0.2,
    "mxint8": 2e-2,
}


def _mlp():
    torch.manual_seed(10)
    return nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 192, bias=False), nn.GELU(), nn.Linear(192, 64))


@pytest.mark.parametrize("name", ALL_MODES)
def test_mode_on_mlp(name):
    mlp = _mlp()
    x = torch.randn(6, 128, generator=_gen(11))
    x[:, 3] *= 10  # an outlier feature (exercises LLM.int8's float path)
    ref = mlp(x)
    mode = get_mode(name)
    m = mode.apply(copy.deepcopy(mlp))
    y = m(x.to(mode.act_dtype))
    assert y.dtype == mode.act_dtype
    rel = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= MLP_TOL[name], (name, rel)
    assert not any(isinstance(mod, nn.Linear) for mod in m.modules()) or name in ("fp32", "bf16", "fp16")


def test_llm_int8_beats_w8a8_with_outlier_feature():
    mlp = _mlp()
    x = torch.randn(6, 128, generator=_gen(11))
    x[:, 3] *= 10
    ref = mlp(x)
    err = {n: (get_mode(n).apply(copy.deepcopy(mlp))(x) - ref).abs().max().item() for n in ("int8", "w8a8")}
    assert err["int8"] < 0.6 * err["w8a8"], err


class DenseCausal:
    """Minimal AttentionContext: one sequence, causal, GQA, computed in fp32."""

    def __init__(self, scale: float):
        self.scale = scale

    def attention(self, layer, q, k, v, window):
        t, h, d = q.shape
        rep = h // k.shape[1]
        qf, kf, vf = q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
        s = torch.einsum("thd,shd->hts", qf, kf) * self.scale
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        if window is not None:
            mask &= ~torch.ones(t, t, dtype=torch.bool).tril(-window)
        s = s.masked_fill(~mask, float("-inf"))
        return torch.einsum("hts,shd->thd", s.softmax(-1), vf).to(q.dtype)


TINY_CFGS = {
    "llama": dict(family="llama"),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "gemma3": dict(
        family="gemma3",
        qk_norm=True,
        sandwich_norm=True,
        norm_offset=1.0,
        embed_scale=8.0,
        activation="gelu_tanh",
        sliding_window=4,
        layer_types=("sliding", "full"),
        final_logit_softcap=30.0,
    ),
}


def _tiny(family: str) -> Decoder:
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position=64,
        tie_embeddings=True,
        **TINY_CFGS[family],
    )
    torch.manual_seed(12)
    model = Decoder(cfg)
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0 / cfg.embed_scale)
        for mod in model.modules():
            if isinstance(mod, layers_module.RMSNorm):
                mod.weight.uniform_(-0.2, 0.2).add_(1.0 - cfg.norm_offset)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.1)
    return model.eval()


def _run(model, cfg):
    ids = torch.tensor([1, 5, 9, 33, 2, 7, 60, 11, 3, 95])
    pos = torch.arange(len(ids))
    with torch.no_grad():
        h = model(ids, pos, DenseCausal(cfg.scale))
        return h, model.compute_logits(h)


# max |logits - logits_fp32| / max |logits_fp32| (observed worst over the 3 families, x ~2 margin:
# bf16 .007, fp16 .001, layercast .005, int8/w8a8 .013, mxint8 .019, w4 .12-.16 (gemma3))
TINY_TOL = {
    "fp32": 0.0,
    "bf16": 0.015,
    "fp16": 0.003,
    "layercast": 0.01,
    "int8": 0.03,
    "w8a8": 0.03,
    "w4": 0.25,
    "w4-g128": 0.3,
    "w4-asym": 0.25,
    "w4-g128-asym": 0.3,
    "mxint8": 0.04,
}


@pytest.mark.parametrize("family", list(TINY_CFGS))
@pytest.mark.parametrize("name", ALL_MODES)
def test_mode_on_tiny_model(family, name):
    src_before = inspect.getsource(decoder_module) + inspect.getsource(layers_module)
    base = _tiny(family)
    cfg = base.cfg
    _, ref = _run(base, cfg)
    mode = get_mode(name)
    model = mode.apply(copy.deepcopy(base))
    assert model.numerics == name
    h, logits = _run(model, cfg)
    assert h.dtype == mode.act_dtype and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    rel = ((logits - ref).abs().max() / ref.abs().max()).item()
    assert rel <= TINY_TOL[name], (name, family, rel)
    # module swap, not a model-file branch
    assert inspect.getsource(decoder_module) + inspect.getsource(layers_module) == src_before
    assert "numerics" not in inspect.getsource(decoder_module)
    lin_type = {
        "fp32": nn.Linear,
        "bf16": nn.Linear,
        "fp16": nn.Linear,
        "layercast": PackedLayerCastLinear if kernel_available() else LayerCastLinear,
        "int8": LLMInt8Linear,
        "w8a8": Int8Linear,
        "mxint8": MXInt8Linear,
    }.get(name, W4Linear)
    for lin in (model.layers[0].attn.q_proj, model.layers[1].mlp.down_proj):
        assert type(lin) is lin_type
    if mode.float_lm_head:  # output projection left float in act_dtype, tie kept
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == mode.act_dtype
        if cfg.tie_embeddings:
            assert model.lm_head.weight is model.embed.weight
    elif name == "layercast" and cfg.tie_embeddings:  # the tied head shares the bf16 table: per-call upcast
        assert type(model.lm_head) is LayerCastLinear
    else:
        assert type(model.lm_head) is lin_type
    # embeddings / norms / tying
    if name in ("fp32", "bf16", "fp16"):
        assert model.lm_head.weight is model.embed.weight
        assert model.embed.weight.dtype == mode.act_dtype
        assert model.norm.weight.dtype == mode.act_dtype
    elif name == "layercast":
        assert (model.lm_head.weight is model.embed.weight) == cfg.tie_embeddings
        assert model.embed.weight.dtype == torch.bfloat16 and isinstance(model.embed, CastEmbedding)
        assert model.norm.weight.dtype == torch.bfloat16
        assert model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    else:
        assert model.embed.weight.dtype == torch.float32  # kept float (as loaded)
        assert model.norm.weight.dtype == torch.float32
    # rotary tables untouched (fp32)
    assert model.layers[0].attn.rotary.tables(8)[0].dtype == torch.float32


def test_int_modes_keep_bf16_embedding_and_cast_lookup():
    base = _tiny("llama")
    base.embed.weight.data = base.embed.weight.data.bfloat16()  # e.g. a bf16 checkpoint
    model = get_mode("w8a8").apply(base)
    assert isinstance(model.embed, CastEmbedding) and model.embed.weight.dtype == torch.bfloat16
    out = model.embed(torch.tensor([1, 2]))
    assert out.dtype == torch.float32
    assert torch.equal(out, model.embed.weight[[1, 2]].float())


def test_chunked_linear_matches_full():
    g = _gen(13)
    k, n = 4096, 600  # 256 rows per chunk -> 3 chunks (last one partial)
    x, w, b = torch.randn(3, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    y = quant.chunked_linear(x, n, lambda s, e: w[s:e], b)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    lin = nn.Linear(k, n)
    lc = LayerCastLinear(copy.deepcopy(lin))
    expect = F.linear(x, lin.weight.detach().bfloat16().float(), lin.bias.detach().bfloat16().float())
    torch.testing.assert_close(lc(x), expect, atol=1e-4, rtol=1e-5)
