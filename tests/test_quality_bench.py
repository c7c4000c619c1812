"""`ditto quality` and `ditto bench` on the tiny llama fixture: well-formed rows, exact self-agreement."""

from __future__ import annotations

import math

import pytest
import torch

from ditto import LLM
from ditto.bench import percentile, rich_table, run_bench
from ditto.quality import compare, markdown, model_bytes, run_quality, token_windows

TEXT = (
    "The quick brown fox jumps over the lazy dog. What is 12 plus 30? The answer is 42. "
    "Let's think step by step. Natalia sold clips to 48 of her friends in April.\n"
) * 8


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("quality") / "text.txt"
    p.write_text(TEXT)
    return p


def test_token_windows():
    assert token_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert token_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail scores nothing


def test_quality_rows(tiny_llama, text_file):
    res = run_quality(
        str(tiny_llama),
        ["fp32", "bf16", "no-such-mode"],
        tokens=96,
        window=32,
        batch=2,
        text=str(text_file),
        llm_options={"threads": 1},
    )
    rows = {r.mode: r for r in res.rows}
    assert list(rows) == ["fp32", "bf16", "no-such-mode"]
    ref = rows["fp32"]
    assert ref.tokens == res.meta["tokens_scored"] > 0
    assert ref.kl_mean == 0.0 and ref.kl_max == 0.0
    assert ref.top1_agree_pct == 100.0 and ref.ppl_change_pct == 0.0
    bf = rows["bf16"]
    assert bf.tokens == ref.tokens
    assert math.isfinite(bf.perplexity) and bf.perplexity > 1.0
    assert bf.kl_mean >= 0.0 and 0.0 <= bf.top1_agree_pct <= 100.0
    assert bf.weights_bytes < ref.weights_bytes  # bf16 weights are half the size
    assert bf.kv_bytes_per_token * 2 == ref.kv_bytes_per_token
    assert rows["no-such-mode"].note.startswith("skipped") and rows["no-such-mode"].tokens == 0
    md = markdown(res)
    assert md.count("\n| ") == 1 + len(res.rows)
    assert res.to_dict()["rows"][0]["mode"] == "fp32"


def test_fp32_against_separate_fp32_instance_is_exact(tiny_llama, text_file):
    a = LLM(str(tiny_llama), numerics="fp32", progress=False, threads=1, kv_cache_gb=0.01)
    b = LLM(str(tiny_llama), numerics="fp32", progress=False, threads=1, kv_cache_gb=0.01)
    ids = a.encode(TEXT, add_special_tokens=False)[:40]
    ra = a.score(ids[:1], ids[1:], keep_logits=True)
    rb = b.score(ids[:1], ids[1:], keep_logits=True)
    c = compare(ra.logits, rb.logits, torch.tensor(ra.token_ids))
    assert c["kl"] == 0.0 and c["agree"] == c["tokens"] == len(ids) - 1
    assert model_bytes(a.numerics.model) > 0


def test_bench_four_prompts(tiny_llama):
    llm = LLM(str(tiny_llama), numerics="fp32", progress=False, threads=1, kv_cache_gb=0.01)
    prompts = [llm.encode(t) for t in ("What is 2+2?", "The quick brown fox", "Natalia sold clips", "def add")]
    r = run_bench(llm, prompts, output_len=6)
    assert r["prompts"] == 4 and r["output_tokens"] == 24
    assert r["decode_tokens"] + r["prefill_tokens"] >= 24
    assert r["output_tok_s"] > 0 and r["ttft_p50_s"] <= r["latency_p99_s"]
    assert r["tpot_p50_s"] is not None and r["threads"] == 1
    rich_table(r)
    s = run_bench(llm, prompts[:2], output_len=3, single_stream=True, warmup=False)
    assert s["mode"] == "single-stream" and s["output_tokens"] == 6


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
