"""A receipt edited and re-sealed (content hash recomputed) must never verify `exact`.

Each claimed field is forged on an honest `batch_invariant` receipt and the verdict is asserted: the
status, and the field and position the verifier names. Under `fast`, logprobs are judged within a
tolerance and a difference above it is flagged; below it the verdict is `consistent`, never `exact`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ditto import LLM, SamplingParams
from ditto.verify.build import receipt_for
from ditto.verify.receipt import Receipt
from ditto.verify.replay import Thresholds, precheck_receipt, verify_receipt

PROMPT = "Natalia sold clips to 48 of her friends"


@pytest.fixture(scope="module")
def model_dir(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def bi(tiny_llama):
    return LLM(str(tiny_llama), numerics="fp32", determinism="batch_invariant", progress=False)


def _receipt(llm, **kw) -> Receipt:
    sp = SamplingParams(**{"temperature": 0.8, "top_p": 0.9, "seed": 11, "max_tokens": 24, "ignore_eos": True,
                           "fingerprint_k": 8, **kw})  # fmt: skip
    out = llm.generate([PROMPT, "def add(a, b):"], sp)[0]  # made in a batch of two, replayed alone
    return receipt_for(llm, out, out.outputs[0], sp)


@pytest.fixture(scope="module")
def honest(bi) -> Receipt:
    r = _receipt(bi)
    assert verify_receipt(bi, r).status == "exact"
    return r


def _forge(r: Receipt, **changes) -> Receipt:
    return dataclasses.replace(r, **changes).seal()  # a re-sealed edit: the content hash is valid


def _sampling(r: Receipt, **changes) -> dict:
    return {**r.sampling, **changes}


def _bump(values, i: int, by: float) -> tuple:
    return tuple(v + by if j == i else v for j, v in enumerate(values))


def test_each_forged_field_is_caught(bi, honest):
    r = honest
    tokens = list(r.output_token_ids)
    tokens[5] = (tokens[5] + 1) % 256
    fps = list(r.fingerprints)
    fps[7] = _bump(fps[7], 3, 1e-6)
    forged = {
        "token": (_forge(r, output_token_ids=tuple(tokens)), "inconsistent", ("output_token_ids", 5)),
        "logprob": (_forge(r, output_logprobs=_bump(r.output_logprobs, 9, 0.91)), "inconsistent",
                    ("output_logprobs", 9)),
        "logprob by 1 ulp": (_forge(r, output_logprobs=_bump(r.output_logprobs, 2, math.ulp(r.output_logprobs[2]))),
                             "inconsistent", ("output_logprobs", 2)),
        "fingerprint": (_forge(r, fingerprints=tuple(fps)), "inconsistent", ("fingerprints", 7)),
        "numerics": (_forge(r, numerics="bf16"), "unverifiable", ("numerics", None)),
        "determinism exact": (_forge(r, determinism="exact"), "inconsistent", ("numerics", None)),
        "seed": (_forge(r, sampling=_sampling(r, seed=12)), "inconsistent", ("output_token_ids", None)),
        "temperature": (_forge(r, sampling=_sampling(r, temperature=0.5)), "inconsistent", ("output_token_ids", None)),
        "top_p": (_forge(r, sampling=_sampling(r, top_p=0.3)), "inconsistent", ("output_token_ids", None)),
        "model digest": (_forge(r, model_digest="sha256:" + "ab" * 32), "unverifiable", ("model_digest", None)),
        "prompt ids": (_forge(r, prompt_token_ids=(*r.prompt_token_ids[:-1], (r.prompt_token_ids[-1] + 1) % 256)),
                       "inconsistent", ("output_logprobs", 0)),
    }  # fmt: skip
    for name, (receipt, status, (field, index)) in forged.items():
        assert receipt.check_integrity() == [], name  # the hash is valid: only the replay can tell
        v = verify_receipt(bi, receipt)
        assert v.status == status and not v.ok, (name, v.summary())
        assert v.divergence is not None and v.divergence["field"] == field, (name, v.divergence)
        if index is not None:
            assert v.divergence["index"] == index, (name, v.divergence)
        if field == "output_logprobs" and index == 9:
            assert v.divergence["claimed"] == receipt.output_logprobs[9] != v.divergence["reference"]
            assert v.divergence["reference"] == r.output_logprobs[9]  # the honest value, bit for bit


def test_weaker_determinism_claim_still_replays_exact(bi, honest):
    """batch_invariant -> fast claims less than was delivered: the tokens are still what the model makes."""
    v = verify_receipt(bi, _forge(honest, determinism="fast"))
    assert v.status == "exact" and v.comparison == "tolerance"


def test_a_verifier_that_cannot_reproduce_the_level_is_unverifiable(model_dir, honest):
    fast = LLM(str(model_dir), numerics="fp32", determinism="fast", progress=False)
    v = verify_receipt(fast, honest)
    assert v.status == "unverifiable" and "batch_invariant" in v.reason and v.divergence["field"] == "determinism"


def test_model_free_checks_need_no_model(honest):
    assert precheck_receipt(honest) is None
    edited = dataclasses.replace(honest, output_logprobs=_bump(honest.output_logprobs, 0, 0.5))  # not re-sealed
    v = precheck_receipt(edited)
    assert v.status == "inconsistent" and v.tampered
    v = precheck_receipt(_forge(honest, numerics="fp8"))
    assert v.status == "unverifiable" and "fp8" in v.reason
    v = precheck_receipt(_forge(honest, sampling=_sampling(honest, max_tokens=3)))
    assert v.status == "inconsistent" and "max_tokens=3" in v.reason
    v = precheck_receipt(_forge(honest, sampling=_sampling(honest, seed=None)))
    assert v.status == "unverifiable" and "seed" in v.reason


def test_batch_invariant_from_another_device_is_judged_within_tolerance(bi, honest):
    moved = _forge(honest, hardware={**honest.hardware, "device": "cuda:0"})
    assert verify_receipt(bi, moved).status == "exact"  # the same bits are still exact
    off = _forge(moved, output_logprobs=_bump(honest.output_logprobs, 4, 1e-7))
    v = verify_receipt(bi, off)
    assert v.status == "consistent" and v.comparison == "tolerance" and any("cuda" in n for n in v.notes)
    lp = next(f for f in v.fields if f["field"] == "output_logprobs")
    assert lp["different"] == 1 and lp["flagged"] == 0  # reported, not dropped
    assert "output_logprobs: 1/24 differ" in v.summary()


def test_a_receipt_from_another_ditto_version_is_judged_within_tolerance(bi, honest):
    """Kernels (and so the bits of batch_invariant) change between versions: an older receipt is
    judged by tolerances, with the reason, instead of failing bitwise."""
    older = _forge(honest, ditto_version="0.1.0")
    off = _forge(older, output_logprobs=_bump(honest.output_logprobs, 2, 1e-7))
    v = verify_receipt(bi, off)
    assert v.status == "consistent" and v.comparison == "tolerance"
    assert any("ditto 0.1.0" in n for n in v.notes)
    assert verify_receipt(bi, _forge(honest, output_logprobs=_bump(honest.output_logprobs, 2, 1e-7))).status == (
        "inconsistent"  # the same version: bitwise
    )


def test_fast_logprobs_are_judged_by_the_tolerance(model_dir):
    fast = LLM(str(model_dir), numerics="fp32", determinism="fast", progress=False)
    r = _receipt(fast)
    assert verify_receipt(fast, r).ok  # made in a batch of two, replayed alone: honest noise at most
    tolerance = Thresholds().for_numerics("fp32").logprob_abs  # measured for fp32 `fast`, shipped with ditto
    assert tolerance < Thresholds().logprob_abs
    small = _forge(r, output_logprobs=_bump(r.output_logprobs, 3, tolerance / 4))
    v = verify_receipt(fast, small)
    assert v.status == "consistent" and v.logprob_max_abs_diff == pytest.approx(tolerance / 4, rel=0.1)
    assert any("measured defaults for numerics fp32" in n for n in v.notes)
    big = _forge(r, output_logprobs=_bump(r.output_logprobs, 3, 0.91))
    v = verify_receipt(fast, big)
    assert v.status == "inconsistent" and v.divergence["field"] == "output_logprobs" and v.divergence["index"] == 3
    assert f"tolerance {tolerance:.4g}" in v.reason
    # a calibrated tolerance replaces the default
    v = verify_receipt(fast, small, Thresholds(logprob_abs=0.001, source="calibrated"))
    assert v.status == "inconsistent"


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the answers must come from the model-free checks."""
    import ditto.cli

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ditto.cli, "make_llm", refuse)


def test_cli_answers_tampered_and_unreadable_receipts_without_a_model(honest, tmp_path, capsys, no_model):
    from ditto.cli import main

    tampered = tmp_path / "tampered.json"
    doc = json.loads(honest.to_json())
    doc["output_logprobs"][0] += 0.5
    tampered.write_text(json.dumps(doc))
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    notjson = tmp_path / "notes.txt"
    notjson.write_text("hello\n")
    assert main(["verify", str(tampered)]) == 1
    assert "content hash mismatch" in capsys.readouterr().out
    assert main(["verify", str(binary), str(notjson), "--json"]) == 2
    results = json.loads(capsys.readouterr().out)["results"]
    assert [d["status"] for d in results] == ["error", "error"]
    assert str(binary) in results[0]["reason"] and "not UTF-8" in results[0]["reason"]
    assert "line 1 column 1" in results[1]["reason"] and str(notjson) in results[1]["reason"]


def test_cli_names_the_forged_field(bi, honest, model_dir, tmp_path, capsys):
    from ditto.cli import main

    path = tmp_path / "forged.json"
    _forge(honest, output_logprobs=_bump(honest.output_logprobs, 9, 0.91)).save(path)
    args = ["verify", str(path), "--model", str(model_dir)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "INCONSISTENT" in out and "output_logprobs[9]" in out
    assert main(args + ["--json"]) == 1
    (res,) = json.loads(capsys.readouterr().out)["results"]
    assert res["divergence"]["field"] == "output_logprobs" and res["divergence"]["index"] == 9
    # numerics forged fp32 -> bf16: the CLI replays in the claimed bf16, whose bits differ
    _forge(honest, numerics="bf16").save(path)
    assert main(args + ["--json"]) == 1
    (res,) = json.loads(capsys.readouterr().out)["results"]
    assert res["status"] == "inconsistent" and res["comparison"] == "bitwise"
