"""A GGUF file read straight from its memory map: metadata, tensor table and tensor bytes.

Layout (little-endian, versions 2 and 3): magic ``GGUF``, u32 version, u64 tensor count, u64
key/value count; the key/values (string key, u32 value type, value; arrays are u32 item type, u64
count, items); the tensor table (string name, u32 n_dims, u64 dims ne0 first, u32 ggml type, u64
offset into the data section); padding to ``general.alignment`` (default 32); the tensor data.

Metadata strings are decoded with plain ``bytes.decode`` (no per-string numpy objects), numeric
arrays with one ``np.frombuffer`` each. Tensor bytes are never read here: ``GGUFTensor.data`` is a
view of the map, which is private (copy-on-write), so a weight handed out without conversion stays
the file's page-cache pages until something writes to it.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class GGUFError(ValueError):
    """A GGUF file that ditto cannot load, with the reason."""


# ggml type id -> (name, values per block, bytes per block): gguf.constants.GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}  # fmt: skip

# GGUF value types: 0-7 and 10-12 scalars, 8 string, 9 array.
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table; ``data`` is its raw bytes, a view of the file's map."""

    name: str
    type_name: str  # ggml type, e.g. "Q4_1", "F32"
    shape: tuple[int, ...]  # as stored: ne0 (the contiguous dimension) first
    offset: int  # absolute, in the file
    n_bytes: int
    data: np.ndarray  # uint8, (n_bytes,)

    @property
    def rows_cols(self) -> tuple[int, ...]:
        """The shape in torch order (the contiguous dimension last)."""
        return tuple(reversed(self.shape))


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (key -> value, arrays as lists) and ``tensors`` (file order)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError as exc:  # an empty file cannot be mapped
                raise GGUFError(f"{self.path} is not a GGUF file (empty)") from exc
        try:
            self.metadata, self.tensors, self.data_offset = _parse(self._map, self.path)
        except GGUFError:
            raise
        except (struct.error, ValueError, UnicodeDecodeError, OverflowError) as exc:
            raise GGUFError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {exc}") from exc

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/values of a GGUF header (arrays as lists), without touching tensor data."""
    return GGUFFile(path).metadata


# ---------------------------------------------------------------- parsing
def _parse(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[GGUFTensor], int]:
    if buf[:4] != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        swapped = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise GGUFError(f"{path}: unsupported GGUF version {version}{swapped}; ditto reads versions 2 and 3")
    reader = _Reader(buf, 24)
    metadata = _Metadata()
    for _ in range(n_kv):
        key = reader.string()
        if key in metadata:
            raise GGUFError(f"{path}: duplicate metadata key {key!r}")
        metadata[key] = reader.value(reader.u32())
    table = []
    for _ in range(n_tensors):
        name = reader.string()
        (n_dims,) = reader.unpack("<I")
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = reader.unpack(f"<{n_dims}Q")
        kind, offset = reader.unpack("<IQ")
        table.append((name, dims, kind, offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-reader.pos // alignment) * alignment
    return metadata, _tensors(buf, path, table, data_offset), data_offset


def _tensors(buf: mmap.mmap, path: Path, table: list, data_offset: int) -> list[GGUFTensor]:
    everything = np.frombuffer(buf, dtype=np.uint8)
    tensors, seen = [], set()
    for name, dims, kind, offset in table:
        if name in seen:
            raise GGUFError(f"{path}: duplicate tensor {name!r}")
        seen.add(name)
        type_name, block, block_bytes = GGML_TYPES.get(kind, (f"ggml type {kind}", 0, 0))
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if block and (not dims or dims[0] % block):
            raise GGUFError(f"{path}: tensor {name!r} ({type_name}) has rows of {dims[:1]} values, not whole blocks")
        n_bytes = n // block * block_bytes if block else 0
        start = data_offset + offset
        if start + n_bytes > len(buf):
            raise GGUFError(
                f"{path} is truncated: tensor {name!r} needs bytes {start}..{start + n_bytes}, the file has {len(buf)}"
            )
        data = everything[start : start + n_bytes]
        tensors.append(GGUFTensor(name, type_name, tuple(int(d) for d in dims), start, n_bytes, data))
    return tensors


class _Reader:
    """A cursor over the header: every read checks that the bytes are there (ValueError / struct.error
    if not; GGUFFile names the file)."""

    def __init__(self, buf: mmap.mmap, pos: int):
        self.buf, self.pos, self.size = buf, pos, len(buf)

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)  # raises struct.error past the end
        self.pos += struct.calcsize(fmt)
        return values

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        end = start + n
        if end > self.size:
            raise ValueError(f"string of {n} bytes at offset {self.pos} runs past the end of the file")
        self.pos = end
        return self.buf[start:end].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])[0]
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype} at offset {self.pos}")
        itype, n = self.unpack("<IQ")
        if itype == _STRING:
            return self._strings_later(n)
        if itype in _SCALARS:
            dtype = np.dtype(_SCALARS[itype])
            if self.pos + n * dtype.itemsize > self.size:
                raise ValueError(f"array of {n} values at offset {self.pos} runs past the end of the file")
            items = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
            return items
        return [self.value(itype) for _ in range(n)]  # arrays of arrays

    def _strings_later(self, n: int) -> _Strings:
        """Step over an array of n strings (checking every length against the file), decoding none."""
        buf, pos, size = self.buf, self.pos, self.size
        start = pos
        length = struct.Struct("<Q").unpack_from
        for _ in range(n):
            (k,) = length(buf, pos)
            if pos + 8 + k > size:
                raise ValueError(f"string of {k} bytes at offset {pos} runs past the end of the file")
            pos += 8 + k
        self.pos = pos
        return _Strings(buf, start, n)


@dataclass(frozen=True)
class _Strings:
    """An array of strings not decoded yet: where it starts in the map and how many there are."""

    buf: mmap.mmap
    pos: int
    n: int

    def decode(self) -> list[str]:
        buf, pos, out = self.buf, self.pos, []
        length = struct.Struct("<Q").unpack_from
        for _ in range(self.n):
            (k,) = length(buf, pos)
            out.append(buf[pos + 8 : pos + 8 + k].decode("utf-8", errors="replace"))
            pos += 8 + k
        return out


class _Metadata(dict):
    """Key -> value, with arrays of strings (vocabularies, merges: ~0.08 s for SmolLM2's) decoded on first
    access: a load whose tokenizer comes from the cache never decodes them. Every way of reading a
    value (indexing, get, items, values, copying into a dict) goes through the decoding."""

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if type(value) is _Strings:
            value = value.decode()
            super().__setitem__(key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 (self.get would recurse)

    def array_len(self, key: str) -> int:
        """How many items the array at `key` has (0 when absent), without decoding it."""
        value = super().get(key)
        return value.n if type(value) is _Strings else len(value) if value is not None else 0

    def __iter__(self):  # not dict's own: dict(m) and {**m} then read values through __getitem__
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return [(key, self[key]) for key in self]

    def values(self) -> list[Any]:  # type: ignore[override]
        return [self[key] for key in self]
