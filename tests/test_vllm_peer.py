"""vLLM's CPU build as a peer, through ditto's openai backend and `ditto verify --claims`.

These tests need vLLM, which lives in its own venv (.venv-vllm, made by `make peers`: it pins its own torch).
Where that venv is missing (CI, a fresh clone) every test here is skipped and says so. With it, one vLLM fp32
server on the bundled SmolLM2 (exported to an HF folder by benchmarks/export_hf.py) serves the module:
  - greedy generation through the openai backend equals ditto fp32 in process, token for token;
  - teacher-forced scores (vLLM's prompt_logprobs) equal ditto fp32's within fp32 cross-engine noise;
  - a sampled vLLM answer verifies consistent against ditto's fp32 reference, and the same answer
    claimed at another temperature does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="vLLM's CPU build is not installed here (.venv-vllm; `make peers` makes it)"
)

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is 17 * 23?", "Name three primary colours.", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def vllm():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from export_hf import export
    from peer_servers import vllm_server

    with vllm_server(export(MODEL), "float32", threads=2, max_num_seqs=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def ref():
    from ditto import LLM

    return LLM(MODEL, numerics="fp32", progress=False)


@pytest.fixture(scope="module")
def remote(vllm):
    from ditto.backends.openai import OpenAIBackend
    from ditto.loader.registry import resolve_model

    backend = OpenAIBackend(vllm.url + "/v1", tokenizer=str(resolve_model(MODEL)), max_concurrency=3)
    yield backend
    backend.close()


def test_greedy_generation_equals_ditto_fp32(remote, ref):
    from ditto import SamplingParams

    prompts = [ref.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    got = remote.generate(prompts, params)
    want = ref.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    info = remote.info()
    assert info["backend"] == "openai" and info["server_version"]  # vLLM answers GET /version


def test_scores_match_ditto_fp32(remote, ref):
    prompt = ref.chat_prompt([{"role": "user", "content": "What is 2+2?"}])
    got, want = remote.score(prompt, " It is 4."), ref.score(prompt, " It is 4.")
    assert got.token_ids == want.token_ids
    gap = max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs))
    assert gap < 1e-3  # measured ~1e-5: fp32 in both engines, different kernels


def test_sampled_answer_verifies_and_a_wrong_temperature_does_not(vllm, ref, tmp_path, capsys):
    from ditto.cli import main

    prompt = ref.chat_prompt([{"role": "user", "content": QUESTIONS[2]}])
    body = {"model": vllm.model, "prompt": prompt, "max_tokens": 64, "temperature": 0.7, "seed": 3, "logprobs": 1}
    body |= {"ignore_eos": True, "return_token_ids": True}
    r = httpx.post(vllm.url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    honest = {"request": body, "response": r.json()}
    greedy_body = dict(body, temperature=0.0)
    g = httpx.post(vllm.url + "/v1/completions", json=greedy_body, timeout=300)
    g.raise_for_status()
    lied = {"request": dict(greedy_body, temperature=1.0), "response": g.json()}  # greedy claimed as T=1
    for name, exchange, rc_want in (("honest", honest, 0), ("lied", lied, 1)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(exchange) + "\n")
        rc = main(["verify", "--from-openai", str(path), "--model", MODEL, "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert rc == rc_want, doc["results"][0]["reason"]
