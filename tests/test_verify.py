"""Verification end to end: receipts, replay verdicts, tampering, dishonest configs, CLI, claims."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.verify.build import params_from_record, receipt_for
from ditto.verify.claims import parse_claims
from ditto.verify.receipt import Receipt, generate_keypair
from ditto.verify.replay import (
    Thresholds,
    calibrate,
    verify_claims,
    verify_receipt,
    verify_receipts,
)

PROMPTS = ["The quick brown fox", "What is 12 plus 30?", "def add(a, b):", "Natalia sold clips", "The answer is"]


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def ref(model_dir):
    return LLM(str(model_dir), numerics="fp32", determinism="batch_invariant", progress=False)


@pytest.fixture(scope="module")
def honest(ref):
    """Receipts of sampled generations made in one big batch (fingerprints on)."""
    prompts = PROMPTS * 3
    params = [
        SamplingParams(temperature=0.7, seed=100 + i, max_tokens=16, ignore_eos=True, fingerprint_k=16)
        for i in range(len(prompts))
    ]
    outs = ref.generate(prompts, params)
    return [receipt_for(ref, o, o.outputs[0], p) for o, p in zip(outs, params)]


def _edit(receipt: Receipt, reseal: bool = True, **changes) -> Receipt:
    edited = dataclasses.replace(receipt, **changes)
    return edited.seal() if reseal else edited


def _sampling(receipt: Receipt, **changes) -> dict:
    rec = dict(receipt.sampling)
    rec.update(changes)
    return rec


def test_receipt_records_the_run(ref, honest):
    r = honest[0]
    assert r.model_digest == ref.model_digest
    assert r.tokenizer_digest == ref.tokenizer.digest
    assert (r.numerics, r.determinism) == ("fp32", "batch_invariant")
    assert r.sampling["seed"] == 100 and r.sample_index == 0
    assert r.fingerprint_k == 16 and r.fingerprint_seed is not None and len(r.fingerprints) == 16
    assert len(r.output_logprobs) == len(r.output_token_ids) == 16
    assert r.hardware["threads"] >= 1 and r.extra["kv_dtype"] == "float32"
    assert r.check_integrity() == []
    assert params_from_record(r.sampling) == SamplingParams(
        temperature=0.7, seed=100, max_tokens=16, ignore_eos=True, fingerprint_k=16
    )


def test_honest_batch_receipts_verify_exact_alone(ref, honest):
    for v in verify_receipts(ref, honest, chunk=1):  # each verified alone (batch of one)
        assert v.status == "exact", v.summary()
        assert v.margins and all(m == 0.0 for m in v.margins)  # margins are 0 for honest tokens
        assert v.activation["exact"] and v.activation["mean"] == 0.0  # fingerprints reproduce bit for bit
        assert v.first_divergence is None and v.logprob_max_abs_diff == 0.0


def test_exact_mode_receipts_verify_exact(model_dir):
    """`exact` (integer numerics): receipts of a sampled batch made on 2 threads verify `exact` when
    replayed one at a time on 1 thread, and a receipt claiming another seed does not."""
    saved = torch.get_num_threads()
    llm = LLM(str(model_dir), numerics="integer", determinism="exact", threads=2, progress=False)
    params = [
        SamplingParams(temperature=0.8, seed=40 + i, max_tokens=12, ignore_eos=True, fingerprint_k=8)
        for i in range(len(PROMPTS))
    ]
    try:
        outs = llm.generate(PROMPTS, params)
        receipts = [receipt_for(llm, o, o.outputs[0], p) for o, p in zip(outs, params)]
        torch.set_num_threads(1)
        verdicts = verify_receipts(llm, receipts, chunk=1)
    finally:
        torch.set_num_threads(saved)
    assert {r.determinism for r in receipts} == {"exact"} and {r.numerics for r in receipts} == {"integer"}
    for v in verdicts:
        assert v.status == "exact", v.summary()
        assert all(m == 0.0 for m in v.margins) and v.activation["exact"]
    wrong = _edit(receipts[0], sampling=_sampling(receipts[0], seed=999))
    assert verify_receipt(llm, wrong).status == "inconsistent"


def test_greedy_receipt_exact(ref):
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    o = ref.generate([PROMPTS[0], PROMPTS[1]], sp)[1]
    v = verify_receipt(ref, receipt_for(ref, o, o.outputs[0], sp))
    assert v.status == "exact" and v.method == "greedy"


@pytest.mark.parametrize(
    "changes",
    [
        {"output_token_ids": "swap"},
        {"prompt_token_ids": (1, 2, 3)},
        {"sampling": "seed"},
        {"sampling": "temperature"},
        {"sample_index": 3},
        {"fingerprints": "perturb"},
        {"output_logprobs": "perturb"},
        {"model_digest": "sha256:" + "00" * 32},
        {"numerics": "bf16"},
        {"determinism": "fast"},
        {"hardware": {"cpu": "someone else's"}},
        {"extra": {}},
        {"finish_reason": "stop"},
        {"created": "2000-01-01T00:00:00Z"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_tampered_field_is_caught(ref, honest, changes):
    r = honest[1]
    ((name, value),) = changes.items()
    if value == "swap":
        value = tuple(reversed(r.output_token_ids))
    elif value == "seed":
        value = _sampling(r, seed=7)
    elif value == "temperature":
        value = _sampling(r, temperature=1.0)
    elif value == "perturb" and name == "fingerprints":
        value = tuple(tuple(x + (1e-9 if i == 0 else 0.0) for i, x in enumerate(row)) for row in r.fingerprints)
    elif value == "perturb":
        value = tuple(x - 0.5 for x in r.output_logprobs)
    v = verify_receipt(ref, _edit(r, reseal=False, **{name: value}))
    assert v.status == "inconsistent" and v.tampered, v.summary()
    assert "content hash mismatch" in v.reason


def test_signed_receipts(ref, honest, tmp_path):
    priv, pub = generate_keypair(tmp_path / "key")
    other_priv, other_pub = generate_keypair(tmp_path / "other")
    signed = honest[2].seal(priv)
    assert verify_receipt(ref, signed, public_key=pub).status == "exact"
    assert verify_receipt(ref, signed, public_key=other_pub).tampered
    # re-sealing an edit without the key drops the signature: caught when a key is required
    resealed = _edit(signed, output_token_ids=signed.output_token_ids[:-1], output_logprobs=None, fingerprints=None,
                     fingerprint_k=0, fingerprint_seed=None)  # fmt: skip
    assert verify_receipt(ref, resealed, public_key=pub).tampered
    # keeping the old signature with a fixed-up hash: the signature no longer matches
    forged = dataclasses.replace(resealed, public_key=signed.public_key, signature=signed.signature)
    forged = dataclasses.replace(forged, content_hash=forged.compute_hash())
    v = verify_receipt(ref, forged)
    assert v.tampered and "signature invalid" in v.reason


def test_wrong_seed_and_wrong_temperature_fail(ref):
    sp = SamplingParams(temperature=0.1, seed=5, max_tokens=24, ignore_eos=True)
    o = ref.generate([PROMPTS[0]], sp)[0]
    r = receipt_for(ref, o, o.outputs[0], sp)
    assert verify_receipt(ref, r).status == "exact"
    for change in ({"seed": 6}, {"temperature": 1.0}, {"top_k": 2, "temperature": 1.0}):
        v = verify_receipt(ref, _edit(r, sampling=_sampling(r, **change)))
        assert v.status == "inconsistent" and not v.tampered, (change, v.summary())
        assert v.first_divergence is not None and v.first_divergence["claimed_text"] is not None


def test_edited_tokens_resealed_are_inconsistent(ref, honest):
    r = honest[3]
    ids = list(r.output_token_ids)
    ids[4] = (ids[4] + 1) % 300
    v = verify_receipt(ref, _edit(r, output_token_ids=tuple(ids), output_logprobs=None, fingerprints=None,
                                  fingerprint_k=0, fingerprint_seed=None))  # fmt: skip
    assert v.status == "inconsistent" and v.first_divergence["index"] == 4
    fd = v.first_divergence
    assert fd["claimed_id"] == ids[4] and fd["reference_id"] == r.output_token_ids[4]
    assert isinstance(fd["claimed_text"], str) and isinstance(fd["reference_text"], str)


def test_w4_run_claimed_as_fp32_is_inconsistent(ref, model_dir):
    w4 = LLM(str(model_dir), numerics="w4", determinism="batch_invariant", progress=False)
    sp = SamplingParams(temperature=0.7, seed=1, max_tokens=24, ignore_eos=True, fingerprint_k=16)
    o = w4.generate([PROMPTS[0]], sp)[0]
    r = receipt_for(w4, o, o.outputs[0], sp)
    assert r.numerics == "w4"
    claimed = _edit(r, numerics="fp32", model_digest=ref.model_digest)
    v = verify_receipt(ref, claimed)
    assert v.status == "inconsistent" and not v.tampered, v.summary()
    assert v.activation["mean"] > v.activation["threshold"]


def test_model_mismatch_is_unverifiable_with_the_reason(ref, honest, tiny_dirs):
    other = LLM(str(tiny_dirs["qwen2"]), numerics="fp32", determinism="batch_invariant", progress=False)
    v = verify_receipt(other, honest[0])
    assert v.status == "unverifiable" and not v.ok and "different model" in v.reason
    assert v.divergence["field"] == "model_digest" and v.n_tokens == 0  # nothing was replayed


def test_calibrate_writes_a_threshold_file(ref, tmp_path):
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=8, fingerprint_k=8) for i in range(3)]
    doc = calibrate(ref, PROMPTS[:3], params, batch_sizes=(1, 3), threads=(None, 1), out=tmp_path / "th.json")
    th = Thresholds.load(tmp_path / "th.json")
    assert doc["token_difr"]["n_honest"] == 12 and doc["token_difr"]["honest_max"] == 0.0
    assert th.token == doc["token_difr"]["threshold"] >= doc["floor"] and th.activation >= doc["floor"]


def test_cli_round_trip(model_dir, tmp_path, capsys):
    from ditto.cli import main

    key = tmp_path / "k"
    assert main(["keygen", str(key)]) == 0
    assert main(["keygen", str(key)]) == 1  # exists, no --force
    assert main(["keygen", str(key), "--force"]) == 0
    receipt = tmp_path / "r.json"
    gen = ["generate", "--model", str(model_dir), "--determinism", "batch_invariant", "--raw", "--temperature", "0.7",
           "--seed", "9", "--max-tokens", "10", "--fingerprint-k", "8"]  # fmt: skip
    assert main(gen + ["--receipt", str(receipt), "--sign-key", str(key), "The quick brown fox"]) == 0
    capsys.readouterr()
    doc = json.loads(receipt.read_text())
    doc["sampling"]["seed"] = 10
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["verify", str(receipt), str(bad), "--pubkey", str(key) + ".pub", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)  # one JSON document
    good_out, bad_out = sorted(doc["results"], key=lambda d: d["file"] != str(receipt))
    assert doc["exit_status"] == 1
    assert good_out["status"] == "exact" and good_out["signed"] and good_out["n_tokens"] == 10
    assert bad_out["status"] == "inconsistent" and bad_out["tampered"]
    # a different model given with --model: unverifiable with the reason, exit 2
    assert main(["verify", str(receipt), "--model", str(model_dir.parent / "qwen3")]) == 2
    assert "different model" in capsys.readouterr().out


def test_claims_from_transformers_greedy(ref, model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    lines = []
    for i, prompt in enumerate(PROMPTS[:3]):
        ids = ref.encode(prompt)
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=0)  # fmt: skip
        out = gen[0, len(ids) :].tolist()
        lines.append({"id": f"c{i}", "prompt_token_ids": ids, "output_token_ids": out, "temperature": 0})
    # text-only claim (re-tokenized by the verifier)
    text = tok.decode(lines[0]["output_token_ids"])
    lines.append({"id": "text", "prompt": PROMPTS[0], "output_text": text, "temperature": 0})
    rng = random.Random(0)
    bad = dict(lines[1], id="bad", output_token_ids=list(lines[1]["output_token_ids"]))
    bad["output_token_ids"][3] = rng.randrange(3, 300)
    lines.append(bad)
    path = tmp_path / "claims.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    claims = parse_claims(path.read_text().splitlines())
    verdicts = {c.id: v for c, v in zip(claims, verify_claims(ref, claims))}
    for cid in ("c0", "c1", "c2"):
        assert verdicts[cid].status in ("exact", "consistent") and verdicts[cid].method == "greedy"
        assert verdicts[cid].score < 0.02
    assert verdicts["text"].ok or verdicts["text"].notes  # re-tokenization may split differently
    assert verdicts["bad"].status == "inconsistent" and verdicts["bad"].first_divergence["index"] == 3
