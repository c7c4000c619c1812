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
