"""`--json` prints one JSON document on stdout and nothing else, for every command that has it.

Real subprocesses (stdout and stderr separate, not a terminal), on a tiny model, run from an empty
folder with $DITTO_DATA unset: the commands' default data (the samples shipped in the package) is
what they read, so these are also the out-of-the-box runs of bench, eval, quality and repro.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {k: v for k, v in os.environ.items() if k != "DITTO_DATA"} | {"TOKENIZERS_PARALLELISM": "false"}


def ditto(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from ditto.cli import main; sys.exit(main())", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def one_document(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # raises on anything besides one JSON document (whitespace aside)


@pytest.fixture
def tiny(tiny_llama) -> list[str]:
    return ["--model", str(tiny_llama), "--threads", "1", "--kv-cache-gb", "0.05"]


def test_models_json_has_full_digests_and_the_table_is_not_cut_when_piped(tmp_path):
    rows = one_document(ditto(["models", "--json"], tmp_path))
    assert {r["name"] for r in rows} >= {"smollm2-135m-instruct"}
    available = [r for r in rows if r["available"]]
    assert available, rows
    for r in available:
        assert re.fullmatch(r"[0-9a-f]{64}", r["sha256"]) and Path(r["path"]).is_file()
    table = ditto(["models"], tmp_path)
    assert table.returncode == 0 and "…" not in table.stdout
    for r in available:
        assert r["sha256"] in table.stdout and r["path"] in table.stdout


def test_generate_json(tiny, tmp_path):
    doc = one_document(ditto(["generate", *tiny, "--max-tokens", "4", "--json", "What is 2+2?"], tmp_path))
    assert 1 <= len(doc["token_ids"]) <= 4 and isinstance(doc["text"], str)
    assert doc["metrics"]["sampling"]["temperature"] == 0.0 and doc["chat_template"] is True


def test_bench_json_on_the_bundled_sample(tiny, tmp_path):
    proc = ditto(["bench", *tiny, "--prompts", "2", "--output-len", "3", "--json", "-"], tmp_path)
    doc = one_document(proc)
    assert doc["prompts"] == 2 and doc["output_tokens"] == 6
    assert "output tok/s" in proc.stderr  # the table went to stderr


def test_quality_json_on_the_bundled_sample(tiny, tmp_path):
    args = ["quality", *tiny, "--modes", "fp32,bf16", "--tokens", "48", "--window", "24", "--json", "-"]
    doc = one_document(ditto(args, tmp_path))
    assert doc["meta"]["tokens_scored"] > 0
    assert [r["mode"] for r in doc["rows"]] == ["fp32", "bf16"]


def test_eval_and_repro_json_on_the_bundled_sample(tiny, tmp_path):
    run = tmp_path / "run"
    summary = one_document(
        ditto(["eval", *tiny, "--limit", "2", "--max-tokens", "4", "--out", str(run), "--json"], tmp_path)
    )
    assert summary["problems"] == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert "ditto/data/gsm8k-train.jsonl" in json.dumps(manifest)  # the sample shipped in the package
    cmp = one_document(ditto(["eval", "compare", str(run), str(run), "--json"], tmp_path))
    assert isinstance(cmp, dict)
    study = tmp_path / "study"
    args = ["repro", *tiny, "--task", "gsm8k", "--limit", "2", "--max-tokens", "4", "--numerics", "fp32"]
    args += ["--determinism", "fast", "--batch-sizes", "1", "--out", str(study), "--json", "--no-progress"]
    metrics = one_document(ditto(args, tmp_path))
    assert metrics["prompts"] == 2
