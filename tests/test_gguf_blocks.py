"""The gguf block kernels (csrc/gguf_blocks.c) are bit-identical to gguf_reference.linear for every
weight kind, batch size, row position, thread count and instruction-set path; close to the float64
product with the gguf package's dequantised weights; strict about their arguments; and exact on
real tensors of the bundled GGUF files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditto.numerics.kernels import gguf_blocks as gb
from ditto.numerics.kernels import gguf_reference as ref
from ditto.numerics.kernels.cbuild import CLibrary

needs_kernel = pytest.mark.skipif(not gb.kernel_available(), reason=f"kernel: {gb.kernel_status()}")

FP16_FIELDS = {  # byte offsets of each block's fp16 scales
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
A32 = [k for k in gb.KINDS if ref.activation_block(k) == 32]
A256 = [k for k in gb.KINDS if ref.activation_block(k) == 256]


def blocks(kind: str, n: int, k: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    """Random but valid weight rows: random bytes, the fp16 scale fields small normal values."""
    rng = np.random.default_rng(seed)
    per, size, _ = ref.BLOCKS[kind]
    raw = rng.integers(0, 256, size=(n, k // per, size), dtype=np.uint8)
    for off in FP16_FIELDS[kind]:
        h = (rng.standard_normal((n, k // per)) * scale).astype(np.float16)
        raw[..., off : off + 2] = h.view(np.uint8).reshape(n, k // per, 2)
    return torch.from_numpy(raw.reshape(n, -1))


def acts(m: int, k: int, seed: int) -> torch.Tensor:
    """Activations with per-row magnitudes over several octaves, a zero block and a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2.0 ** torch.randint(-6, 6, (m, 1), generator=g)
    x[0, :32] = 0.0
    if m > 2:
        x[2] = 0.0
    return x


def shapes(kind: str) -> list[tuple[int, int]]:
    """(K, N) like the bundled models' layers; N not a multiple of 16."""
    if kind in A32:
        return [(576, 13), (1536, 100), (640, 37), (2048, 21)]
    return [(256, 13), (1024, 100), (2048, 37), (1536, 21)]


def paths() -> list[str]:
    return list(gb.isa_paths())


# ----------------------------------------------------------------------------- exactness
@needs_kernel
@pytest.mark.parametrize("kind", gb.KINDS)
def test_equals_reference_on_every_path(kind):
    """(a) + (d): torch.equal with gguf_reference.linear, with and without bias, on every ISA path."""
    for i, (k, n) in enumerate(shapes(kind)):
        w = blocks(kind, n, k, seed=i)
        x = acts(5, k, seed=i)
        bias = torch.randn(n) if i % 2 else None
        want = ref.linear(x, w, kind, bias)
        for isa in paths():
            got = gb.block_linear(x, w, kind, bias, isa=isa)
            assert got.dtype == torch.float32 and got.shape == (5, n)
            assert torch.equal(got, want), (kind, k, n, isa, (got - want).abs().max().item())


@needs_kernel
@pytest.mark.parametrize("kind", gb.KINDS)
def test_rows_are_batch_invariant(kind):
    """(b): every row of a batch (M = 1..64, and 200 > one work item) equals that row computed alone,
    in any order, on every path; the batch itself equals the reference."""
    k, n = shapes(kind)[1]
    w = blocks(kind, n, k, seed=7)
    x = acts(200, k, seed=7)
    full = gb.block_linear(x, w, kind)
    assert torch.equal(full, ref.linear(x, w, kind))
    for m in range(1, 65):
        assert torch.equal(gb.block_linear(x[:m], w, kind), full[:m]), m
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    for isa in paths():
        alone = torch.cat([gb.block_linear(x[i : i + 1], w, kind, isa=isa) for i in range(64)])
        assert torch.equal(alone, full[:64]), isa
        assert torch.equal(gb.block_linear(x[perm], w, kind, isa=isa), full[perm]), isa
        assert torch.equal(gb.block_linear(x, w, kind, isa=isa), full), isa


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_thread_count_does_not_change_a_bit(kind):
    """(c): 1 vs 2 threads, with many tiles, and with fewer tiles than threads (the batch is split);
    K = 2048 keeps every case above the kernel's threshold for using threads at all."""
    k = 2048
    old = torch.get_num_threads()
    try:
        for n, m in [(576, 1), (576, 37), (13, 64), (5, 130)]:
            w, x = blocks(kind, n, k, seed=n), acts(m, k, seed=m)
            out = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                out.append([gb.block_linear(x, w, kind, isa=isa) for isa in paths()])
            for a, b in zip(*out, strict=True):
                assert torch.equal(a, b), (n, m)
    finally:
        torch.set_num_threads(old)


@needs_kernel
@pytest.mark.parametrize("block", [32, 256])
def test_quantize_activations_equal_reference(block):
    k = 512
    x = acts(6, k, seed=block)
    x[1, :block] = torch.arange(block) % 16 - 7.5  # amax 127: scale 1, exact ties round half to even
    x[1, 0] = 127.0
    x[3, 40] = 1e-38  # amax below 127 / FLT_MAX: an infinite scale, 0 * inf = NaN -> 0
    x[4] *= 1e30
    x[5, :block] = torch.tensor([3.0e38, -3.0e38] * (block // 2))
    want = ref.quantize_activations(x, block)
    for isa in paths():
        got = gb.quantize_activations(x, block, isa=isa)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), isa


@needs_kernel
def test_non_finite_inputs_give_the_reference_result():
    w = blocks("Q4_1", 20, 64, seed=3)
    x = torch.randn(3, 64)
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    want = ref.linear(x, w, "Q4_1")
    for isa in paths():
        torch.testing.assert_close(gb.block_linear(x, w, "Q4_1", isa=isa), want, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- accuracy
@needs_kernel
@pytest.mark.parametrize("kind", gb.KINDS)
def test_close_to_float64_product_with_gguf_dequantisation(kind):
    """(e): 8-bit activations keep the result within 2e-2 (relative, Frobenius) of x @ W^T in float64,
    W dequantised by the gguf package."""
    quants = pytest.importorskip("gguf.quants")
    gguf = pytest.importorskip("gguf")
    k, n = shapes(kind)[1]
    w = blocks(kind, n, k, seed=11)
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(11))
    deq = quants.dequantize(w.numpy(), gguf.GGMLQuantizationType[kind])
    assert deq.shape == (n, k)
    exact = x.double() @ torch.from_numpy(np.asarray(deq, dtype=np.float64)).T
    got = gb.block_linear(x, w, kind).double()
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 2e-2, rel


# ----------------------------------------------------------------------------- arguments
@needs_kernel
def test_bad_arguments_raise_clear_errors(monkeypatch):
    """(f)."""
    w = blocks("Q4_1", 8, 64, seed=0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="no gguf block kernel for 'Q2_K'"):
        gb.block_linear(x, w, "Q2_K")
    with pytest.raises(ValueError, match="K=48 is not a positive multiple of the activation block 32"):
        gb.block_linear(torch.randn(2, 48), w, "Q4_1")
    with pytest.raises(ValueError, match="K=32 is not a positive multiple of the activation block 256"):
        gb.block_linear(torch.randn(2, 32), w, "Q4_K")
    with pytest.raises(ValueError, match="rows of 40 bytes do not hold K=96"):
        gb.block_linear(torch.randn(2, 96), w, "Q4_1")
    with pytest.raises(ValueError, match="must be contiguous"):
        gb.block_linear(x, blocks("Q4_1", 8, 128, seed=0)[:, :40], "Q4_1")
    with pytest.raises(TypeError, match="uint8"):
        gb.block_linear(x, w.to(torch.int16), "Q4_1")
    with pytest.raises(ValueError, match="2-D"):
        gb.block_linear(x, w.reshape(-1), "Q4_1")
    with pytest.raises(TypeError, match="floating-point"):
        gb.block_linear(x.long(), w, "Q4_1")
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        gb.block_linear(x, w, "Q4_1", torch.zeros(7))
    with pytest.raises(ValueError, match="isa='sse9'"):
        gb.block_linear(x, w, "Q4_1", isa="sse9")
    monkeypatch.setenv(gb.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="DITTO_GGUF_ISA='sse9'"):
        gb.block_linear(x, w, "Q4_1")
    with pytest.raises(ValueError, match="activation blocks are 32"):
        gb.quantize_activations(x, 64)


@needs_kernel
def test_isa_environment_variable_forces_a_path(monkeypatch):
    assert paths()[-1] == "portable"
    w = blocks("Q5_0", 30, 640, seed=5)
    x = acts(3, 640, seed=5)
    want = ref.linear(x, w, "Q5_0")
    for isa in paths():
        monkeypatch.setenv(gb.ISA_ENV, isa)
        assert torch.equal(gb.block_linear(x, w, "Q5_0"), want), isa


def test_shapes_and_empty_inputs():
    w = blocks("Q8_0", 9, 64, seed=2)
    x = torch.randn(2, 3, 64)
    y = gb.block_linear(x, w, "Q8_0")
    assert y.shape == (2, 3, 9)
    assert torch.equal(y.reshape(6, 9), ref.linear(x.reshape(6, 64), w, "Q8_0"))
    assert gb.block_linear(torch.zeros(0, 64), w, "Q8_0").shape == (0, 9)
    assert gb.block_linear(x[0], w[:0], "Q8_0").shape == (3, 0)
    assert torch.equal(gb.block_linear(x[0].double(), w.numpy(), "Q8_0"), ref.linear(x[0], w, "Q8_0"))


def test_without_the_kernel_the_reference_runs(monkeypatch):
    monkeypatch.setenv("DITTO_GGUF_TEST_OFF", "1")
    monkeypatch.setattr(gb, "_LIBRARY", CLibrary("gguf_blocks.c", "DITTO_GGUF_TEST_OFF", gb._setup, gb._FLAGS))
    assert not gb.kernel_available() and "disabled" in gb.kernel_status()
    assert gb.isa_paths() == ()
    w = blocks("Q6_K", 10, 256, seed=4)
    x = acts(2, 256, seed=4)
    assert torch.equal(gb.block_linear(x, w, "Q6_K"), ref.linear(x, w, "Q6_K"))
    assert all(torch.equal(a, b) for a, b in zip(gb.quantize_activations(x, 256), ref.quantize_activations(x, 256)))
    with pytest.raises(ValueError, match="no kernel"):
        gb.block_linear(x, w, "Q6_K", isa="portable")


# ----------------------------------------------------------------------------- real tensors
def _tensor(gguf_file, name: str) -> tuple[torch.Tensor, str, int]:
    t = next(t for t in gguf_file.tensors if t.name == name)
    n, k = t.rows_cols
    return torch.from_numpy(t.data.reshape(n, -1)), t.type_name, k


def _check_real(gguf_file, name: str, kind: str, rows: slice | None = None) -> None:
    w, got_kind, k = _tensor(gguf_file, name)
    assert got_kind == kind
    if rows is not None:
        w = w[rows]
    x = acts(3, k, seed=len(name))
    want = ref.linear(x, w, kind)
    for isa in paths() or [None]:
        assert torch.equal(gb.block_linear(x, w, kind, isa=isa), want), (name, isa)


def test_bundled_smollm2_tensors():
    """(g): a Q4_1 layer and Q8_0 embedding rows of the bundled SmolLM2-135M file."""
    from ditto.loader.gguf_file import GGUFFile
    from ditto.loader.registry import bundled_path

    try:
        f = GGUFFile(bundled_path("smollm2-135m-instruct"))
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"bundled model missing: {e}")
    _check_real(f, "blk.0.ffn_down.weight", "Q4_1")
    _check_real(f, "token_embd.weight", "Q8_0", slice(1000, 1300))


def test_bundled_gemma_tensors():
    """(g): Q4_K, Q6_K, Q5_0 and Q8_0 layers of the bundled gemma-3-270m file, when present."""
    from ditto.loader.gguf_file import GGUFFile
    from ditto.loader.registry import bundled_path

    try:
        f = GGUFFile(bundled_path("gemma3-270m"))
    except Exception as e:  # noqa: BLE001 - the optional package, its parts or the cache may be absent
        pytest.skip(f"gemma file unavailable: {e}")
    _check_real(f, "blk.0.attn_output.weight", "Q4_K")
    _check_real(f, "blk.0.ffn_down.weight", "Q6_K")
    _check_real(f, "blk.0.attn_q.weight", "Q5_0")
    _check_real(f, "blk.0.attn_v.weight", "Q8_0")


@pytest.mark.parametrize("kind", gb.KINDS)
def test_reference_reads_blocks_as_the_gguf_package_does(kind):
    """The contract's view of a block (its integers and scales) dequantises to exactly the gguf
    package's values: the kernels compute on the numbers the file means."""
    quants = pytest.importorskip("gguf.quants")
    import gguf

    k = 512 if kind in A256 else 576
    w = blocks(kind, 23, k, seed=5).numpy()
    ours = ref.dequantize(w, kind, k)
    theirs = quants.dequantize(w, gguf.GGMLQuantizationType[kind]).reshape(23, k)
    assert np.array_equal(np.asarray(ours, dtype=np.float32), np.asarray(theirs, dtype=np.float32))
