"""The `integer` numerics mode on tiny random models: integer-only forward, bit-identical logits
across thread counts, batch composition, chunking and cache layout, and closeness to float."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ditto.config import ModelConfig
from ditto.engine.attention import DecodeRows, PrefillChunk
from ditto.models.decoder import Decoder
from ditto.numerics import calibration
from ditto.numerics.integer import DenseIntContext, IntegerMode, IntegerPagedAttention, IntKVCache

CONFIGS = {
    "llama": dict(family="llama"),
    "qwen3": dict(family="qwen3", qk_norm=True, qkv_bias=True),
    "gemma3": dict(
        family="gemma3",
        sandwich_norm=True,
        norm_offset=1.0,
        embed_scale=8.0,
        activation="gelu_tanh",
        sliding_window=5,
        layer_types=("sliding", "full"),
        rope_local_theta=10000.0,
        rope_theta=1000000.0,
    ),
}


def tiny_model(kind: str, seed: int = 0) -> Decoder:
    cfg = ModelConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, max_position=256, **CONFIGS[kind],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1.0 - cfg.norm_offset) + 0.2 * torch.randn_like(p))
            elif p.dim() == 2 and "embed" not in name:
                p.normal_(0, p.shape[1] ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def calibrated(kind: str):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randint(0, 97, (40,), generator=g).tolist() for _ in range(4)]
    stats = calibration.collect_stats(model, chunks, rope_positions=256)
    float_model = copy.deepcopy(model)
    mode = IntegerMode(stats)
    return float_model, mode.apply(model), mode


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    return calibrated(request.param)


def int_logits(model, seqs: list[list[int]], ctx=None) -> list[torch.Tensor]:
    """Prefill every sequence in one flattened batch; per-sequence logits (n, V)."""
    ctx = (ctx or DenseIntContext()).step([(i, len(s)) for i, s in enumerate(seqs)])
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, pos, ctx))
    return list(logits.split([len(s) for s in seqs]))


def test_forward_is_integer_only(models):
    _, model, _ = models
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    seen.append(str(func))
            return out

    ids, pos = torch.tensor([3, 5, 7, 11, 13, 2, 4, 6]), torch.arange(8)
    with torch.inference_mode(), Spy():
        hidden = model(ids, pos, DenseIntContext().step([(0, 8)]))
    assert hidden.dtype == torch.int32
    assert seen == [], seen  # not one floating-point op up to the final hidden state
    logits = model.compute_logits(hidden)
    ints = model.integer_mode.logits_int(logits)
    assert torch.equal(ints.double() * model.integer_mode.logit_scale, logits.double())  # exact bridge


def test_close_to_float(models):
    float_model, model, _ = models
    seq = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = float_model.compute_logits(
        float_model(torch.tensor(seq), torch.arange(30), calibration.CausalContext(float_model.cfg.scale))
    ).double()
    got = int_logits(model, [seq])[0].double()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.1, rel
    agree = (got.argmax(-1) == ref.argmax(-1)).double().mean().item()
    assert agree > 0.8, agree


def test_identical_across_threads_and_batch(models):
    _, model, _ = models
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 17, 4, 23)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int_logits(model, seqs)
        torch.set_num_threads(max(2, old))
        two = int_logits(model, seqs)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    for i, s in enumerate(seqs):
        assert torch.equal(int_logits(model, [s])[0], one[i])  # alone vs inside the batch
    assert torch.equal(int_logits(model, [seqs[2], seqs[0]])[1], one[0])  # other neighbours and slot


def test_chunked_prefill_and_decode_identical(models):
    _, model, _ = models
    seq = torch.randint(0, 97, (21,), generator=torch.Generator().manual_seed(8)).tolist()
    full = int_logits(model, [seq])[0]
    ctx = DenseIntContext()
    parts = []
    for lo, hi in [(0, 8), (8, 20), (20, 21)]:
        ctx.step([(0, hi - lo)])
        with torch.inference_mode():
            parts.append(model.compute_logits(model(torch.tensor(seq[lo:hi]), torch.arange(lo, hi), ctx)))
    assert torch.equal(torch.cat(parts), full)


def test_paged_context_matches_dense(models):
    _, model, _ = models
    cfg = model.cfg
    seq = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(9)).tolist()
    dense = int_logits(model, [seq])[0]
    bs = 4
    cache = IntKVCache(cfg.num_layers, 8, bs, cfg.num_kv_heads, cfg.head_dim)
    table = [5, 2, 7]  # scattered blocks
    cache.clear_blocks(table)  # the engine zeroes each block the block manager hands out
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(10)])
    ctx = IntegerPagedAttention(cache, slots, None, [PrefillChunk(0, 10, 0, torch.tensor(table))])
    with torch.inference_mode():
        pre = model.compute_logits(model(torch.tensor(seq[:10]), torch.arange(10), ctx))
        rows = DecodeRows(torch.tensor([0]), torch.tensor([10]), torch.tensor(table), torch.tensor([0, 0, 0]),
                          torch.tensor([0, 4, 8]))  # fmt: skip
        ctx = IntegerPagedAttention(cache, torch.tensor([table[2] * bs + 2]), rows, [])
        dec = model.compute_logits(model(torch.tensor(seq[10:]), torch.tensor([10]), ctx))
    assert torch.equal(torch.cat([pre, dec]), dense)


def test_calibration_roundtrip(tmp_path):
    model = tiny_model("llama")
    stats = calibration.collect_stats(model, [[1, 2, 3, 4, 5, 6]], rope_positions=64)
    path = calibration.save_calibration(tmp_path / "m.int-calib.safetensors", stats)
    back = calibration.load_calibration(path)
    assert back.keys() == stats.keys()
    assert all(torch.equal(back[k], stats[k].to(back[k].dtype)) for k in stats)
    assert back["rope0.cos"].dtype == torch.int16
    assert len(calibration.calibration_digest(path)) == 64
    a = IntegerMode(stats).apply(copy.deepcopy(model))
    b = IntegerMode(back).apply(copy.deepcopy(model))
    ids = [[3, 1, 4, 1, 5, 9]]
    assert torch.equal(int_logits(a, ids)[0], int_logits(b, ids)[0])
