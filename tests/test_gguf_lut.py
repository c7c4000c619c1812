"""The lookup-table GGUF kernel (ditto/csrc/gguf_lut.c) against the contract, bit for bit.

`lut_linear` must return exactly `gguf_reference.linear` for Q4_0 and Q4_1, on the file's own rows and
on the repacked bit-plane layout, with the AVX-512 and the portable kernels, at SmolLM2-135M's shapes;
every row must be the same whatever the batch (M = 1..40, the row alone) and the thread count; a
real tensor of the bundled model goes through too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditto.numerics.kernels import gguf_lut, gguf_reference

pytestmark = pytest.mark.skipif(not gguf_lut.kernel_available(), reason=f"LUT kernel: {gguf_lut.kernel_status()}")

ISAS = ["portable", *(["avx512"] if gguf_lut.has_avx512() else [])]
SHAPES = [(k, n) for k in (576, 1536) for n in (13, 192, 576)]


def random_blocks(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """Random valid blocks, uint8 (N, row_bytes): random bytes, the fp16 d (and m) small normal values."""
    per = gguf_reference.BLOCKS[kind][1]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, k // 32, per), generator=g, dtype=torch.uint8).numpy()
    nf = 1 if kind == "Q4_0" else 2
    scales = (torch.randn(n, k // 32, nf, generator=g) * 0.02).half().numpy()
    raw[..., : 2 * nf] = scales.view(np.uint8).reshape(n, k // 32, 2 * nf)
    return raw.reshape(n, -1)


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Rows of varied scale, with an all-zero block (amax = 0) and exact halves (round half to even)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]
    x[0, :32] = 0.0
    if m > 1 and k >= 64:
        x[1, 32:64] = torch.arange(32) - 15.5
    return x


def weights(raw: np.ndarray, kind: str) -> list:
    return [torch.from_numpy(raw), gguf_lut.repack(raw, kind)]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", gguf_lut.KINDS)
@pytest.mark.parametrize("k,n", SHAPES)
def test_matches_reference(kind, k, n):
    raw = random_blocks(kind, n, k, seed=k + n)
    x = activations(40, k, seed=n)
    bias = torch.randn(n)
    want = gguf_reference.linear(x, raw, kind)
    want_b = gguf_reference.linear(x, raw, kind, bias)
    for w in weights(raw, kind):
        for isa in ISAS:
            assert torch.equal(gguf_lut.lut_linear(x, w, kind, isa=isa), want), (type(w).__name__, isa)
            assert torch.equal(gguf_lut.lut_linear(x, w, kind, bias, isa=isa), want_b), (type(w).__name__, isa)


@pytest.mark.parametrize("kind", gguf_lut.KINDS)
def test_batch_invariant(kind, threads):
    """Every row is the same for M = 1..40, alone, and at 1 or 2 threads."""
    k, n = 1536, 192
    raw = random_blocks(kind, n, k, seed=7)
    x = activations(40, k, seed=8)
    for w in weights(raw, kind):
        for isa in ISAS:
            threads(1)
            full = gguf_lut.lut_linear(x, w, kind, isa=isa)
            for m in range(1, 41):
                assert torch.equal(gguf_lut.lut_linear(x[:m], w, kind, isa=isa), full[:m]), (m, isa)
            for i in range(40):
                assert torch.equal(gguf_lut.lut_linear(x[i : i + 1], w, kind, isa=isa), full[i : i + 1]), (i, isa)
            threads(2)  # another split of the tiles and row chunks
            for m in (1, 2, 17, 33, 40):
                assert torch.equal(gguf_lut.lut_linear(x[:m], w, kind, isa=isa), full[:m]), (m, isa)


def test_bundled_model_tensor():
    from ditto.loader.gguf_file import GGUFFile
    from ditto.loader.registry import bundled_path

    try:
        path = bundled_path("smollm2-135m-instruct")
    except Exception as e:  # the bundled weights are an optional package
        pytest.skip(f"bundled model unavailable: {e}")
    tensor = next(t for t in GGUFFile(path).tensors if t.name == "blk.0.ffn_gate.weight")
    assert tensor.type_name == "Q4_1"
    n, k = tensor.rows_cols
    raw = np.ascontiguousarray(tensor.data).reshape(n, -1)
    x = activations(3, k, seed=11)
    want = gguf_reference.linear(x, raw, "Q4_1")
    for w in weights(raw, "Q4_1"):
        for isa in ISAS:
            assert torch.equal(gguf_lut.lut_linear(x, w, "Q4_1", isa=isa), want), isa


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantisation_is_the_contracts(isa):
    x = activations(16, 1536, seed=3)
    x[2, 100] = 1e-40  # a subnormal in a block of zeros
    x[2, 96:100] = 0.0
    x[2, 101:128] = 0.0
    q, dx, sums = gguf_reference.quantize_activations(x, 32)
    q2, dx2, sx2 = gguf_lut.quantize_activations(x, isa=isa)
    assert torch.equal(q2, q.reshape(16, -1))
    assert torch.equal(dx2, dx)
    assert torch.equal(sx2, sums.sum(-1))


def test_non_finite_inputs_stay_in_their_rows():
    k, n = 64, 16
    raw = random_blocks("Q4_1", n, k, seed=1)
    x = activations(4, k, seed=2)
    x[1, 3] = float("nan")
    x[2, 40] = float("inf")
    for isa in ISAS:
        y = gguf_lut.lut_linear(x, torch.from_numpy(raw), "Q4_1", isa=isa)
        assert y[1].isnan().all() and not y[2].isfinite().any()
        assert torch.equal(y[[0, 3]], gguf_reference.linear(x[[0, 3]], raw, "Q4_1"))


def test_empty_and_tail_shapes():
    raw = random_blocks("Q4_0", 5, 32, seed=4)
    for w in weights(raw, "Q4_0"):
        assert gguf_lut.lut_linear(torch.zeros(0, 32), w, "Q4_0").shape == (0, 5)
        x = activations(3, 32, seed=5)
        assert torch.equal(gguf_lut.lut_linear(x, w, "Q4_0"), gguf_reference.linear(x, raw, "Q4_0"))
    empty = np.zeros((0, 18), dtype=np.uint8)
    assert gguf_lut.lut_linear(torch.ones(2, 32), empty, "Q4_0").shape == (2, 0)
    # a strided (non-contiguous) x and a float64 x give the same bits as their fp32 copy
    raw = random_blocks("Q4_1", 16, 64, seed=6)
    x = activations(6, 128, seed=6)[:, ::2]
    assert torch.equal(gguf_lut.lut_linear(x, raw, "Q4_1"), gguf_reference.linear(x.contiguous(), raw, "Q4_1"))
    assert torch.equal(gguf_lut.lut_linear(x.double(), raw, "Q4_1"), gguf_lut.lut_linear(x, raw, "Q4_1"))


def test_repacked_layout_size():
    for kind, per in (("Q4_0", 18), ("Q4_1", 20)):
        raw = random_blocks(kind, 13, 576, seed=9)
        packed = gguf_lut.repack(raw, kind)
        assert (packed.n, packed.k, packed.kind) == (13, 576, kind)
        assert packed.data.numel() == 16 * 18 * per  # the file's bytes per row, rows padded to 16


def test_clear_errors():
    raw = random_blocks("Q4_1", 8, 64, seed=0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="supports Q4_0, Q4_1"):
        gguf_lut.lut_linear(x, raw, "Q8_0")
    with pytest.raises(ValueError, match="do not hold K=64"):
        gguf_lut.lut_linear(x, raw, "Q4_0")
    with pytest.raises(ValueError, match="multiple of"):
        gguf_lut.lut_linear(torch.randn(2, 48), raw, "Q4_1")
    with pytest.raises(ValueError, match="unknown isa"):
        gguf_lut.lut_linear(x, raw, "Q4_1", isa="neon")
    with pytest.raises(ValueError, match="uint8"):
        gguf_lut.lut_linear(x, raw.astype(np.int16), "Q4_1")
    with pytest.raises(ValueError, match="2-D"):
        gguf_lut.lut_linear(x[0], raw, "Q4_1")
    with pytest.raises(ValueError, match="bias"):
        gguf_lut.lut_linear(x, raw, "Q4_1", torch.zeros(7))
    packed = gguf_lut.repack(raw, "Q4_1")
    with pytest.raises(ValueError, match="Q4_1 LutWeight passed as Q4_0"):
        gguf_lut.lut_linear(x, packed, "Q4_0")
    with pytest.raises(ValueError, match="K=32"):
        gguf_lut.lut_linear(torch.randn(2, 32), packed, "Q4_1")
    if not gguf_lut.has_avx512():
        with pytest.raises(ValueError, match="lacks AVX-512"):
            gguf_lut.lut_linear(x, raw, "Q4_1", isa="avx512")


def test_portable_build_gives_the_same_bits(monkeypatch, tmp_path):
    """Built without -march=native or -ffp-contract=off (the source's own pragma keeps the chain
    unfused), both kernels still return the reference's bits."""
    from kernel_build import use_portable_build

    use_portable_build(monkeypatch, tmp_path, gguf_lut)
    kind, k, n = "Q4_1", 576, 192
    raw = random_blocks(kind, n, k, seed=12)
    x = activations(9, k, seed=13)
    want = gguf_reference.linear(x, raw, kind)
    for w in weights(raw, kind):
        for isa in ISAS:
            assert torch.equal(gguf_lut.lut_linear(x, w, kind, isa=isa), want), isa


@pytest.mark.parametrize("kind", gguf_lut.KINDS)
def test_bound_call_is_lut_linear(kind):
    """LutCall (one packed-argument ctypes call, the decode path's) gives `gguf_reference.linear`'s bits,
    with and without a bias, for one and two rows; inputs it does not take directly (a column slice, a
    float64 row, 1-D) go through `lut_linear` and still give them."""
    k, n = 576, 192
    raw = random_blocks(kind, n, k, seed=3)
    bias = torch.randn(n)
    x = activations(2, k, seed=4)
    for b in (None, bias):
        call = gguf_lut.LutCall(gguf_lut.repack(raw, kind), b)
        for rows in (x[:1], x):
            assert torch.equal(call(rows), gguf_reference.linear(rows, raw, kind, b))
        wide = torch.cat([x, x], dim=1)[:, :k]  # not contiguous
        assert torch.equal(call(wide), gguf_reference.linear(x, raw, kind, b))
        assert torch.equal(call(x.double()), gguf_reference.linear(x, raw, kind, b))
    with pytest.raises(ValueError, match="bias"):
        gguf_lut.LutCall(gguf_lut.repack(raw, kind), torch.randn(n + 1))
