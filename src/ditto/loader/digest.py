"""Model digests for receipts: sha256 over the weight files, cached next to them."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from ditto.loader.registry import cache_dir


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _cache_file(path: Path) -> Path:
    side = path.with_name(path.name + ".sha256.json")
    try:
        side.touch(exist_ok=True)
        return side
    except OSError:  # read-only install: keep the cache in ditto's cache dir instead
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        folder = cache_dir() / "digests"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{path.name}.{key}.json"


def file_digest(path: Path) -> str:
    """sha256 of one file; recomputed only when its size or mtime changed."""
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = _cache_file(path)
    try:
        cached = json.loads(cache.read_text() or "{}")
        if cached.get("stamp") == stamp:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    digest = _sha256(path)
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    return digest


def files_digest(paths: list[Path], extra: bytes = b"") -> str:
    """Digest of a model made of several files (shards), plus optional extra bytes (calibration)."""
    if len(paths) == 1 and not extra:
        return file_digest(paths[0])
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + file_digest(p).encode() + b"\n")
    h.update(extra)
    return h.hexdigest()
