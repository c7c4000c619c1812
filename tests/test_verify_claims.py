"""`ditto verify --claims / --from-openai`: what another engine served, checked against a reference.

The "other engines" are real `ditto serve` apps on loopback: one in the reference numerics (fp32),
one in 4-bit weights (w4). Their saved {request, response} exchanges are verified by the CLI
against fp32; a response that loses ditto's `ditto` extension stands for a foreign engine (vLLM's
`return_tokens_as_token_ids` names its tokens, its seed is not ditto's). The tiny random model's
output layer is scaled up so its next-token distributions are as peaked as a trained model's
(a random one's are nearly flat, where no precision shows).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file
from test_server import _Server

from ditto import LLM
from ditto.cli import main
from ditto.server.app import create_app
from ditto.verify.claims import ClaimError, parse_claims

PROMPTS = ["The quick brown fox", "What is 12 plus 30?", "def add(a, b):", "Natalia sold clips"]
TOKENS = 32


@pytest.fixture(scope="module")
def peaky(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama with its output layer x40: logits spread like a trained model's."""
    out = tmp_path_factory.mktemp("peaky")
    shutil.copytree(tiny_llama, out, dirs_exist_ok=True)
    w = load_file(tiny_llama / "model.safetensors")
    w["lm_head.weight"] = (w["lm_head.weight"] * 40).contiguous()
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def servers(peaky):
    started = {}
    for num in ("fp32", "w4", "bf16"):
        llm = LLM(str(peaky), numerics=num, determinism="batch_invariant", progress=False)
        started[num] = _Server(create_app(llm, served_name="m"))
    yield {num: srv.url for num, srv in started.items()}
    for srv in started.values():
        srv.close()


def _exchange(url: str, kind: str, body: dict, foreign: bool) -> dict:
    if foreign:  # as vLLM answers: token ids named in the logprobs, no `ditto` extension
        body = dict(body, return_tokens_as_token_ids=True)
    r = httpx.post(f"{url}/v1/{kind}", json=body, timeout=60)
    r.raise_for_status()
    resp = r.json()
    if foreign:
        resp.pop("ditto")
    return {"request": body, "response": resp}


def _collect(url: str, temperature: float, foreign: bool = False, tokens: int = TOKENS) -> list[dict]:
    """Per prompt a completion (n=2, seeded) and a chat completion, both with logprobs."""
    out = []
    for i, p in enumerate(PROMPTS):
        common = {"model": "m", "max_tokens": tokens, "temperature": temperature, "seed": i, "ignore_eos": True}
        out.append(_exchange(url, "completions", dict(common, prompt=p, logprobs=1, n=2), foreign))
        chat = dict(common, messages=[{"role": "user", "content": p}], logprobs=True, top_logprobs=1)
        out.append(_exchange(url, "chat/completions", chat, foreign))
    return out


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _verify(capsys, peaky, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(["verify", *args, "--model", str(peaky), "--numerics", "fp32", "--json"])
    doc = json.loads(capsys.readouterr().out)  # one document
    assert doc["exit_status"] == rc
    return rc, doc


def test_honest_responses_verify(servers, peaky, tmp_path, capsys):
    own = _collect(servers["fp32"], 0.8) + _collect(servers["fp32"], 0.0)[:2]
    foreign = _collect(servers["fp32"], 0.8, foreign=True)
    rc, doc = _verify(
        capsys, peaky, "--from-openai", str(_write(tmp_path / "own.jsonl", own)),
        "--claims", str(_write(tmp_path / "foreign.jsonl", foreign)),
    )  # fmt: skip
    res = doc["results"]
    assert rc == 0 and len(res) == 12 + 3 + 12  # n=2 completions: two claims each
    assert all(r["status"] in ("exact", "consistent") for r in res), [r["reason"] for r in res if r["status"]]
    ditto = [r for r in res if r["sampler"] == "ditto"]
    assert all(r["status"] == "exact" for r in ditto)  # same numerics, ditto's seed: every bit
    assert {r["method"] for r in ditto} == {"token_difr", "greedy"}
    other = [r for r in res if r["sampler"] == "other"]
    assert len(other) == 12 and {r["method"] for r in other} == {"logprobs"}
    for r in other:  # tokens from "token_id:N", logprobs bit-equal, the sampler z-test within bounds
        checks = {f["field"]: f for f in r["fields"]}
        assert checks["output_logprobs"]["max_abs_diff"] == 0.0 and abs(checks["sampling"]["score"]) <= 4
    s = doc["summary"]
    assert s["n"] == s["ok"] == 27 and s["reference"]["numerics"] == "fp32"


def test_lower_precision_caught(servers, peaky, tmp_path, capsys):
    own = _collect(servers["w4"], 0.8)
    foreign = _collect(servers["w4"], 0.8, foreign=True)
    rc, doc = _verify(
        capsys, peaky, "--from-openai", str(_write(tmp_path / "own.jsonl", own)),
        "--from-openai", str(_write(tmp_path / "foreign.jsonl", foreign)),
    )  # fmt: skip
    res = doc["results"]
    assert rc == 1 and len(res) == 24
    assert all(r["status"] == "inconsistent" for r in res), [(r["file"], r["reason"]) for r in res]
    for r in res:
        assert any(f["field"] == "output_logprobs" and f["flagged"] for f in r["fields"])  # the logprob comparison
    tokens_flagged = [r for r in res if r["sampler"] == "ditto" and "Token-DiFR score" in r["reason"]]
    assert len(tokens_flagged) >= 6  # Token-DiFR on the claimed tokens alone catches most of ditto's own
    s = doc["summary"]
    assert s["ok"] == 0 and s["counts"] == {"inconsistent": 24} and s["worst"]["status"] == "inconsistent"


def test_bf16_served_caught_against_the_fp32_reference(servers, peaky, tmp_path, capsys):
    """Another engine's bf16 answers: its seed cannot be replayed, so the logprob comparison decides, with the
    threshold measured for claims against an fp32 reference (far under the 0.05 nats of other references)."""
    from ditto.verify.verdict import CLAIM_LOGPROB_THRESHOLDS

    foreign = _collect(servers["bf16"], 0.8, foreign=True)
    rc, doc = _verify(capsys, peaky, "--from-openai", str(_write(tmp_path / "bf16.jsonl", foreign)))
    res = doc["results"]
    assert rc == 1 and len(res) == 12
    for r in res:
        assert r["method"] == "logprobs" and r["status"] == "inconsistent", r["reason"]
        assert r["threshold"] == CLAIM_LOGPROB_THRESHOLDS["fp32"] < r["score"] < 0.05
    honest = _collect(servers["fp32"], 0.8, foreign=True)
    rc, doc = _verify(capsys, peaky, "--from-openai", str(_write(tmp_path / "fp32.jsonl", honest)))
    assert rc == 0 and {r["threshold"] for r in doc["results"]} == {CLAIM_LOGPROB_THRESHOLDS["fp32"]}


def test_wrong_sampler_caught(servers, peaky, tmp_path, capsys):
    lied = []
    for ex in _collect(servers["fp32"], 1.0):  # served at T=1, claimed at T=0.5 / with another seed
        lied.append(copy.deepcopy(ex))
        lied[-1]["request"]["temperature"] = 0.5
        lied.append(copy.deepcopy(ex))
        lied[-1]["request"]["seed"] += 100
    hot = _collect(servers["fp32"], 1.5, foreign=True)  # another engine's seed: the z-test decides
    for ex in hot:
        ex["request"]["temperature"] = 0.7
    greedy = _collect(servers["fp32"], 0.0, foreign=True, tokens=64)
    for ex in greedy:
        ex["request"]["temperature"] = 1.0
    rc, doc = _verify(
        capsys, peaky, "--from-openai", str(_write(tmp_path / "lied.jsonl", lied)),
        "--from-openai", str(_write(tmp_path / "hot.jsonl", hot)),
        "--from-openai", str(_write(tmp_path / "greedy.jsonl", greedy)),
    )  # fmt: skip
    by_file: dict[str, list[dict]] = {}
    for r in doc["results"]:
        by_file.setdefault(Path(r["file"].split("#")[0]).stem, []).append(r)
    assert rc == 1
    assert all(r["status"] == "inconsistent" and r["method"] == "token_difr" for r in by_file["lied"]), [
        (r["status"], r["method"], r["reason"]) for r in by_file["lied"]
    ]
    assert all(r["first_divergence"] is not None for r in by_file["lied"])
    for name in ("hot", "greedy"):
        flagged = [r for r in by_file[name] if r["status"] == "inconsistent"]
        assert len(flagged) == len(by_file[name]) == 12, [r["reason"] for r in by_file[name]]
        assert all("sampler z" in r["reason"] for r in flagged)


def test_malformed_lines_named_and_the_rest_verified(servers, peaky, tmp_path, capsys):
    good = _collect(servers["fp32"], 0.0)[:2]
    flat = {"id": "flat", "prompt": "The quick", "output_token_ids": [5, 6], "temperature": 0, "logprobs": "x"}
    lines = [
        good[0],
        "{not json",
        {"request": {"prompt": "hi"}, "response": {"choices": []}},
        {"request": {"model": "m"}, "response": {"choices": [{"index": 0, "text": "hi"}]}},
        "# a comment, skipped",
        "",
        good[1],
        {"prompt": "a flat claim", "output_text": "x"},  # not an OpenAI exchange
        flat,
    ]
    path = _write(tmp_path / "mixed.jsonl", lines)
    errors: list[ClaimError] = []
    assert len(parse_claims(path.read_text().splitlines(), errors, openai=True)) == 2 + 1  # n=2, then a chat
    assert [str(e).split(":")[0] for e in errors] == ["line 2", "line 3", "line 4", "line 8", "line 9"]
    rc, doc = _verify(capsys, peaky, "--from-openai", str(path))
    res = doc["results"]
    errs = {r["line"]: r["reason"] for r in res if r["status"] == "error"}
    assert sorted(errs) == [2, 3, 4, 8, 9] and rc == 2
    assert "not valid JSON" in errs[2] and "no choices" in errs[3] and "no prompt" in errs[4]
    assert "expected {" in errs[8] and "line 9" in errs[9]
    assert sorted(r["line"] for r in res if r["status"] in ("exact", "consistent")) == [1, 1, 7]
    assert doc["summary"]["counts"] == {"error": 5, "exact": 3} and doc["summary"]["worst"]["status"] == "error"


def test_text_claims_say_whether_they_round_trip(servers, peaky, tmp_path, capsys):
    ex = _collect(servers["fp32"], 0.0)[0]
    text = ex["response"]["choices"][0]["text"]
    lines = [
        {"id": "clean", "prompt": "The quick brown fox", "output_text": " jumps over the lazy dog.", "temperature": 0},
        {"id": "lossy", "prompt": "The quick brown fox", "output_text": "ab\ufffd", "temperature": 0},
        {"id": "served", "prompt": PROMPTS[0], "output_text": text, "temperature": 0},
    ]
    capsys.readouterr()
    rc = main(["verify", "--claims", str(_write(tmp_path / "t.jsonl", lines)), "--model", str(peaky)])
    out = capsys.readouterr().out
    assert "#clean: " in out and "round-trips)" in out.split("#lossy")[0]
    assert "did NOT round-trip: the text holds 1 U+FFFD" in out.split("#lossy")[1].split("#served")[0]
    assert "claims: " in out and " of 3 exact or consistent" in out  # the summary closes the report
    assert rc in (0, 1)
