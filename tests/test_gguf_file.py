"""ditto's own GGUF reader (loader/gguf_file.py) and decoder (loader/dequant.py) against the `gguf` package.

The reference is `gguf.GGUFReader` (metadata via `ReaderField.contents()`, the tensor table) and
`gguf.quants.dequantize`: the same keys in the same order, the same values and Python types, the
same tensors, and bit-identical float32 weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ditto.loader.dequant import dequantize, q4_blocks
from ditto.loader.gguf_file import GGUFError, GGUFFile

gguf = pytest.importorskip("gguf")
slow = pytest.mark.slow
BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def _reference_metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _same_values(a, b) -> bool:
    """Equal, with the same Python types all the way down (1 == 1.0 == True is not enough)."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_same_file(path: Path, *, every_tensor: bool = True) -> None:
    ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    expected = _reference_metadata(ref)
    assert list(ours.metadata) == list(expected)
    for key, value in expected.items():
        assert _same_values(ours.metadata[key], value), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    seen_types = set()
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.type_name, a.shape, a.offset, a.n_bytes) == (
            b.tensor_type.name,
            tuple(int(d) for d in b.shape),
            b.data_offset,
            b.n_bytes,
        ), a.name
        if not every_tensor and a.type_name in seen_types:
            continue
        seen_types.add(a.type_name)
        got = dequantize(a)
        want = np.asarray(gguf.quants.dequantize(b.data, b.tensor_type), dtype=np.float32)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, a.name
        assert torch.equal(got.view(torch.int32), torch.from_numpy(want.view(np.int32).copy())), a.name  # bit for bit
        if a.type_name in ("Q4_0", "Q4_1"):
            q, d, m = q4_blocks(a)  # w = q * d + m, blockwise
            rebuilt = q.float().view(q.shape[0], -1, 32) * d[..., None] + m[..., None]
            assert torch.equal(rebuilt.view(got.shape), got), a.name


# ---------------------------------------------------------------- tiny files written here
def _finite_bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random block bytes whose every fp16 scale is finite: bit 6 clear in every byte caps the exponent."""
    return rng.integers(0, 256, size=shape, dtype=np.uint8) & np.uint8(0xBF)


def _write(path: Path, metadata: dict, tensors: dict[str, tuple[np.ndarray, str | None]]) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in metadata.items():
        if vtype == "array":
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    for name, (data, kind) in tensors.items():
        raw = None if kind is None else gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny(path: Path) -> Path:
    V = gguf.GGUFValueType
    metadata = {
        "t.u8": (200, V.UINT8),
        "t.i8": (-100, V.INT8),
        "t.u16": (60000, V.UINT16),
        "t.i16": (-30000, V.INT16),
        "t.u32": (4_000_000_000, V.UINT32),
        "t.i32": (-2_000_000_000, V.INT32),
        "t.f32": (1e-5, V.FLOAT32),
        "t.bool": (True, V.BOOL),
        "t.str": ("héllo ▁ wörld <|im_end|>", V.STRING),
        "t.empty_str": ("", V.STRING),
        "t.u64": (2**63 + 5, V.UINT64),
        "t.i64": (-(2**62), V.INT64),
        "t.f64": (0.1, V.FLOAT64),
        "t.strings": (["a", "", "ĠĠ", "▁the", "日本", "<0x0A>"], "array"),
        "t.ints": ([3, -1, 7], "array"),
        "t.floats": ([-1000.5, 0.25, 3.0], "array"),
        "t.bools": ([True, False, True], "array"),
        "t.empty": ([], "array"),
    }
    rng = np.random.default_rng(0)
    tensors = {
        "f32": (rng.standard_normal((3, 8), dtype=np.float32), None),
        "f16": (rng.standard_normal((2, 8)).astype(np.float16), None),
        "vec": (rng.standard_normal(5, dtype=np.float32), None),
    }
    for kind in BLOCK_TYPES:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        tensors[kind.lower()] = (_finite_bytes(rng, (3, 2 * size)), kind)  # 3 rows of 2 blocks
    bf16 = rng.standard_normal((2, 4), dtype=np.float32).view(np.uint32) >> 16
    tensors["bf16"] = (bf16.astype(np.uint16).view(np.uint8).reshape(2, 8), "BF16")
    return _write(path, metadata, tensors)


def test_tiny_file_matches_gguf_package(tmp_path):
    _assert_same_file(_tiny(tmp_path / "tiny.gguf"))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_c_decoder_and_numpy_path_match_gguf_package(kind, monkeypatch):
    """The loader's two decoders of the 32-value formats (the gguf kernel library's, the default, and
    numpy's, the fallback) give the gguf package's bits; 5000 blocks take the C decoder's threaded branch."""
    from ditto.loader import dequant
    from ditto.numerics.kernels import gguf_blocks

    if not gguf_blocks.kernel_available():
        pytest.skip(f"gguf kernel unavailable: {gguf_blocks.kernel_status()}")
    qtype = gguf.GGMLQuantizationType[kind]
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = _finite_bytes(np.random.default_rng(len(kind) + size), (5000 * size,))
    want = np.asarray(gguf.quants.dequantize(raw.reshape(-1, size), qtype), dtype=np.float32).reshape(-1, 32)
    from_c = gguf_blocks.dequantize(raw, kind)
    monkeypatch.setenv(dequant.NUMPY_ENV, "1")
    assert dequant._c_decoded(raw, kind) is None  # the switch reaches the loader
    monkeypatch.setattr(dequant, "_c_decoded", lambda raw, kind: None)
    tensor = type(
        "T", (), {"type_name": kind, "data": raw, "rows_cols": (5000, 32), "name": "t", "n_bytes": raw.size}
    )()
    from_numpy = dequant.dequantize_array(tensor)
    for got in (from_c, from_numpy):
        assert torch.equal(torch.from_numpy(got.view(np.int32)), torch.from_numpy(want.view(np.int32)))
    with pytest.raises(ValueError, match="whole blocks"):
        gguf_blocks.dequantize(raw[:-1], kind)


def test_f32_tensors_are_mapped_copy_on_write(tmp_path):
    """An F32 tensor is the file's own pages; writing to it changes neither the file nor a new reader."""
    path = _tiny(tmp_path / "tiny.gguf")
    before = path.read_bytes()
    first = GGUFFile(path)
    tensor = next(t for t in first.tensors if t.name == "f32")
    w = dequantize(tensor)
    assert w.data_ptr() == tensor.data.ctypes.data  # no copy
    w.add_(1.0)
    assert path.read_bytes() == before
    again = dequantize(next(t for t in GGUFFile(path).tensors if t.name == "f32"))
    assert torch.equal(again + 1.0, w)


# ---------------------------------------------------------------- damaged files
def test_truncated_files_name_the_file(tmp_path):
    good = _tiny(tmp_path / "tiny.gguf").read_bytes()
    parsed = GGUFFile(tmp_path / "tiny.gguf")
    data_end = max(t.offset + t.n_bytes for t in parsed.tensors)  # the file may end in padding after it
    for cut in (0, 3, 10, 30, 200, parsed.data_offset - 1, data_end - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(good[:cut])
        with pytest.raises(GGUFError, match=f"cut{cut}.gguf"):
            GGUFFile(bad)


def test_corrupt_headers_are_clear_errors(tmp_path):
    good = bytearray(_tiny(tmp_path / "tiny.gguf").read_bytes())
    cases = {
        "magic": (0, b"GGML", "not a GGUF file"),
        "version": (4, (7).to_bytes(4, "little"), "unsupported GGUF version 7"),
        "kv_count": (16, (10**6).to_bytes(8, "little"), "truncated or corrupt"),
        "key_length": (24, (2**40).to_bytes(8, "little"), "runs past the end"),
    }
    for name, (at, patch, message) in cases.items():
        bad = bytearray(good)
        bad[at : at + len(patch)] = patch
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bytes(bad))
        with pytest.raises(GGUFError, match=message) as err:
            GGUFFile(path)
        assert str(path) in str(err.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty.gguf"):
        GGUFFile(empty)


def test_unknown_value_type_is_a_clear_error(tmp_path):
    path = _write(tmp_path / "one.gguf", {"a": (1, gguf.GGUFValueType.UINT32)}, {})
    raw = bytearray(path.read_bytes())
    key_end = 24 + 8 + len("general.architecture")  # the writer puts general.architecture first
    raw[key_end : key_end + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match="unknown GGUF value type 99"):
        GGUFFile(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no/such.gguf"):
        GGUFFile("no/such.gguf")


# ---------------------------------------------------------------- the bundled models
@slow
def test_bundled_smollm2_matches_gguf_package():
    from ditto.loader.registry import resolve_model

    _assert_same_file(resolve_model("smollm2-135m-instruct"))


@slow
def test_bundled_gemma3_matches_gguf_package():
    from ditto.loader.registry import resolve_model

    _assert_same_file(resolve_model("gemma3-270m"), every_tensor=False)  # one tensor of each of its 5 types


@slow
def test_loaded_f32_weights_are_the_files_pages():
    """load(): a weight the file stores as F32 (SmolLM2's norms) is not copied, a decoded one lives elsewhere."""
    import os

    from ditto.loader.load import load

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    loaded = load("smollm2-135m-instruct", progress=False)

    def mapped_file(ptr: int) -> str | None:
        for line in maps.read_text().splitlines():
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= ptr < end:
                return fields[5] if len(fields) == 6 else None
        return None

    assert loaded.weight_types["norm.weight"] == "F32"
    assert mapped_file(loaded.model.norm.weight.data_ptr()) == os.path.realpath(loaded.path)
    assert loaded.weight_types["layers.0.mlp.up_proj.weight"] == "Q4_1"
    assert mapped_file(loaded.model.layers[0].mlp.up_proj.weight.data_ptr()) != os.path.realpath(loaded.path)
