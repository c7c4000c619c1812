"""A GGUF file's tokenizer built once and cached, keyed by the file's digest.

Building the tokenizer from a GGUF file's metadata means decoding every vocabulary string and merge
and, for SentencePiece vocabularies, deriving the merges from the scores: 0.16 s for SmolLM2's 49k
tokens, 1.7 s for gemma-3's 262k. The finished backend, serialised by the `tokenizers` library
itself, loads in about half that, and the metadata's string arrays are then never decoded.

The entry lives in the cache dir (`DITTO_CACHE`, else ~/.cache/ditto) under tokenizers/, named by
the file's sha256 (`digest.file_digest`: recomputed when the file's size or mtime changes) and a
fingerprint of what built it (this module's and tokenizer.py's source, the `tokenizers` version).
A changed file, a changed builder or an entry that does not parse is a miss: the tokenizer is built
from the file and the entry rewritten. Writes go through a temporary file and a rename, so a
reader never sees half an entry; a cache that cannot be written only costs the rebuild next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from functools import cache
from pathlib import Path

from ditto.loader.digest import file_digest
from ditto.loader.registry import cache_dir

FORMAT = 1
DISABLE_ENV = "DITTO_NO_TOKENIZER_CACHE"  # set: always build from the file (and write nothing)


@cache
def _builder_fingerprint() -> str:
    import tokenizers

    from ditto.loader import tokenizer

    h = hashlib.sha256(f"{FORMAT}\0{tokenizers.__version__}\0".encode())
    for module in (tokenizer.__file__, __file__):
        h.update(Path(module).read_bytes())
    return h.hexdigest()[:16]


def entry_path(gguf_path: Path) -> Path:
    """Where the tokenizer of this file is (or would be) cached."""
    return cache_dir() / "tokenizers" / f"{file_digest(gguf_path)[:32]}-{_builder_fingerprint()}.json"


def from_gguf(gguf):
    """`Tokenizer.from_gguf(gguf)` for a GGUFFile, through the cache."""
    from ditto.loader.tokenizer import Tokenizer

    if os.environ.get(DISABLE_ENV):
        return Tokenizer.from_gguf(gguf)
    entry = entry_path(Path(gguf.path))
    tokenizer = _read(entry, str(gguf.path))
    if tokenizer is None:
        tokenizer = Tokenizer.from_gguf(gguf)
        _write(entry, tokenizer)
    return tokenizer


def _read(entry: Path, source: str):
    from tokenizers import Tokenizer as Backend

    from ditto.loader.tokenizer import Tokenizer

    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
        backend = Backend.from_str(data["backend"])
        return Tokenizer(
            backend,
            bos_id=data["bos_id"],
            eos_id=data["eos_id"],
            stop_ids=data["stop_ids"],
            chat_template=data["chat_template"],
            source=source,
            template_vars=data["template_vars"],
        )
    except Exception:  # missing, unreadable or not a tokenizer (tokenizers raises plain Exception): build
        return None


def _write(entry: Path, tokenizer) -> None:
    data = {
        "backend": tokenizer.backend.to_str(),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "stop_ids": sorted(tokenizer.stop_ids),
        "chat_template": tokenizer.chat_template,
        "template_vars": tokenizer.template_vars,
    }
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, entry)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
