"""First-use costs cached across processes: the compiler's version (kernel cache key) is asked once
per compiler binary, batch_invariant's per-shape GEMM check runs once per layer kind, shape, thread
count, torch build and CPU; a changed key or a corrupt file is detected and the value rebuilt."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from ditto.numerics.kernels import cbuild, padded


@pytest.fixture
def compiler(monkeypatch, tmp_path):
    try:
        cc, version = cbuild.find_compiler()
    except cbuild.KernelBuildError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cbuild, "_VERSIONS", {})
    return cc, version


def _no_process(*args, **kwargs):
    raise AssertionError("a process was started for a compiler version that is cached")


def test_compiler_version_is_asked_once_then_read_from_the_cache(compiler, monkeypatch, tmp_path):
    cc, version = compiler
    assert cbuild.find_compiler() == (cc, version)  # asked once, written to compilers.json
    assert (tmp_path / "cache" / "compilers.json").exists()
    monkeypatch.setattr(cbuild, "_VERSIONS", {})  # a new process: only the disk memo is left
    monkeypatch.setattr(subprocess, "run", _no_process)
    assert cbuild.find_compiler() == (cc, version)


def test_a_new_compiler_binary_is_asked_again(compiler, monkeypatch, tmp_path):
    """A compiler with another mtime (an upgrade) is not taken for the old one."""
    cc, version = compiler
    fake = tmp_path / "cc"
    fake.write_text(f'#!/bin/sh\nexec {cc} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert cbuild.find_compiler()[1] == version
    monkeypatch.setattr(cbuild, "_VERSIONS", {})
    fake.write_text("#!/bin/sh\necho 'another compiler 99'\n")
    os.utime(fake, ns=(1, 1))
    assert cbuild.find_compiler()[1].strip() == "another compiler 99"


def test_corrupt_memo_is_rebuilt(compiler, tmp_path):
    cc, version = compiler
    memo = tmp_path / "cache" / "compilers.json"
    memo.parent.mkdir(parents=True)
    memo.write_text("{not json")
    assert cbuild.find_compiler() == (cc, version)
    assert version in json.loads(memo.read_text()).values()


class _Counting(torch.nn.Linear):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


@pytest.fixture
def verdicts(monkeypatch, tmp_path):
    monkeypatch.setenv("DITTO_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(padded, "_verdicts", {})
    _Counting.calls = 0
    return tmp_path / "cache" / "invariance.json"


def test_invariance_verdict_is_checked_once_then_read_from_disk(verdicts, monkeypatch):
    layer = _Counting(32, 48)
    first = padded.regime_is_invariant(layer, torch.float32)
    assert _Counting.calls > 0 and verdicts.exists()
    monkeypatch.setattr(padded, "_verdicts", {})  # a new process: only the file is left
    _Counting.calls = 0
    assert padded.regime_is_invariant(layer, torch.float32) == first
    assert _Counting.calls == 0
    assert padded.regime_is_invariant(_Counting(32, 64), torch.float32) is not None  # another shape: checked
    assert _Counting.calls > 0 and len(json.loads(verdicts.read_text())) == 2


def test_invariance_verdict_file_corrupt_or_for_another_key_is_not_trusted(verdicts, monkeypatch):
    layer = _Counting(32, 48)
    verdicts.parent.mkdir(parents=True)
    verdicts.write_text("[1, 2")
    ok = padded.regime_is_invariant(layer, torch.float32)
    assert _Counting.calls > 0 and list(json.loads(verdicts.read_text()).values()) == [ok]
    monkeypatch.setattr(padded, "_verdicts", {})
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")  # another torch build
    _Counting.calls = 0
    padded.regime_is_invariant(layer, torch.float32)
    assert _Counting.calls > 0 and len(json.loads(verdicts.read_text())) == 2


# ---------------------------------------------------------------- the GGUF tokenizer cache
TEXTS = ["What is 17 * 23?", "  spaces\tand\nnewlines  ", "日本語 and émojis 🙂", "<|im_start|>user\nhi<|im_end|>"]


def _same_tokenizer(a, b) -> None:
    for text in TEXTS:
        for special in (True, False):
            assert a.encode(text, add_special_tokens=special) == b.encode(text, add_special_tokens=special)
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))
    assert (a.bos_id, a.eos_id, a.stop_ids, a.vocab_size, a.add_bos) == (
        b.bos_id,
        b.eos_id,
        b.stop_ids,
        b.vocab_size,
        b.add_bos,
    )
    assert (a.chat_template, a.template_vars, a.source) == (b.chat_template, b.template_vars, b.source)
    chat = [{"role": "user", "content": "What is 17 * 23?"}]
    assert a.apply_chat_template(chat) == b.apply_chat_template(chat)


@pytest.fixture
def gguf_copy(monkeypatch, tmp_path):
    """The bundled SmolLM2 file copied where the test may change it, and a private cache dir."""
    import shutil

    from ditto.loader.registry import resolve_model

    monkeypatch.setenv("DITTO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DITTO_NO_TOKENIZER_CACHE", raising=False)
    path = tmp_path / "model.gguf"
    shutil.copyfile(resolve_model("smollm2-135m-instruct"), path)
    return path


def test_cached_tokenizer_equals_the_one_built_from_the_file(gguf_copy):
    from ditto.loader import tokenizer_cache
    from ditto.loader.gguf_file import GGUFFile
    from ditto.loader.tokenizer import Tokenizer

    entry = tokenizer_cache.entry_path(gguf_copy)
    assert not entry.exists()
    first = tokenizer_cache.from_gguf(GGUFFile(gguf_copy))  # a miss: built, then written
    assert entry.exists()
    fresh = GGUFFile(gguf_copy)
    cached = tokenizer_cache.from_gguf(fresh)  # a hit: read back
    raw = dict.__getitem__(fresh.metadata, "tokenizer.ggml.tokens")  # what the parse stored
    assert type(raw) is not list  # a hit never decoded the vocabulary
    _same_tokenizer(cached, Tokenizer.from_gguf(GGUFFile(gguf_copy)))
    _same_tokenizer(first, cached)


def test_corrupt_tokenizer_entry_is_rebuilt(gguf_copy):
    from ditto.loader import tokenizer_cache
    from ditto.loader.gguf_file import GGUFFile
    from ditto.loader.tokenizer import Tokenizer

    entry = tokenizer_cache.entry_path(gguf_copy)
    entry.parent.mkdir(parents=True)
    for junk in ("{not json", json.dumps({"backend": "{}", "bos_id": 1}), ""):
        entry.write_text(junk)
        _same_tokenizer(tokenizer_cache.from_gguf(GGUFFile(gguf_copy)), Tokenizer.from_gguf(GGUFFile(gguf_copy)))
        assert json.loads(entry.read_text())["backend"]  # rewritten whole


def test_a_changed_file_is_not_served_its_old_tokenizer(gguf_copy):
    """Edit the chat template inside the copy (same length, so the file stays valid): a new mtime and
    digest, a new entry, and the tokenizer read back carries the edit."""
    from ditto.loader import tokenizer_cache
    from ditto.loader.gguf_file import GGUFFile

    before = tokenizer_cache.from_gguf(GGUFFile(gguf_copy))
    old_entry = tokenizer_cache.entry_path(gguf_copy)
    data = gguf_copy.read_bytes()
    assert data.count(b"named SmolLM,") == 1
    gguf_copy.write_bytes(data.replace(b"named SmolLM,", b"named DittoX,"))
    os.utime(gguf_copy, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    after = tokenizer_cache.from_gguf(GGUFFile(gguf_copy))
    assert tokenizer_cache.entry_path(gguf_copy) != old_entry
    assert "DittoX" in after.chat_template and "DittoX" not in before.chat_template
    assert "DittoX" in tokenizer_cache.from_gguf(GGUFFile(gguf_copy)).chat_template  # and from the new entry


def test_metadata_string_arrays_decode_on_every_read_path():
    """A deferred string array never leaks out of GGUFFile.metadata, however it is read."""
    from ditto.loader.gguf_file import GGUFFile
    from ditto.loader.registry import resolve_model

    key = "tokenizer.ggml.tokens"
    reads = [
        lambda m: m[key],
        lambda m: m.get(key),
        lambda m: dict(m)[key],
        lambda m: {**m}[key],
        lambda m: dict(m.items())[key],
        lambda m: [v for k, v in zip(m, m.values()) if k == key][0],
    ]
    for read in reads:
        meta = GGUFFile(resolve_model("smollm2-135m-instruct")).metadata
        assert meta.array_len(key) == 49152
        tokens = read(meta)
        assert type(tokens) is list and len(tokens) == 49152 and tokens[0] == "<|endoftext|>"
