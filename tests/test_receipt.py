"""Receipts (canonical JSON, content hash, Ed25519 signatures, keygen) and claim parsing."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import stat

import pytest
import torch

from ditto.outputs import CompletionOutput, RequestOutput
from ditto.sampling import SamplingParams
from ditto.verify.activation_difr import fingerprints
from ditto.verify.claims import ClaimError, parse_claims
from ditto.verify.receipt import (
    SCHEMA_VERSION,
    Receipt,
    canonical_json,
    digest_files,
    generate_keypair,
    hardware_info,
    load_private_key,
    load_public_key,
    public_key_hex,
)


def make_receipt(**changes) -> Receipt:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=1234, max_tokens=8)
    fps = fingerprints(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)), 8, seed=7)
    fields = dict(
        model="tiny-random",
        model_digest="sha256:" + "ab" * 32,
        tokenizer_digest="sha256:" + "cd" * 32,
        numerics="fp32",
        determinism="batch_invariant",
        sampling=params.record(),
        sample_index=1,
        prompt_token_ids=(1, 2, 3, 50000),
        output_token_ids=(7, 8, 9, 10, 2),
        output_logprobs=(-0.1, -1 / 3, -1e-300, -math.inf, -0.0),
        finish_reason="stop",
        fingerprint_seed=7,
        fingerprint_k=8,
        fingerprints=tuple(tuple(r) for r in fps.tolist()),
        hardware=hardware_info("cpu"),
        extra={"note": "ünïcødé ✓", "nested": {"b": [1, 2.5, None, True], "a": 5e-324}},
    )
    fields.update(changes)
    return Receipt(**fields)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    priv, pub = generate_keypair(tmp_path_factory.mktemp("keys") / "ditto_ed25519")
    return priv, pub


# --------------------------------------------------------------------------- canonical JSON


def test_canonical_json_is_independent_of_key_order():
    a = {"b": 1, "a": {"y": [1.5, -0.0], "x": "é"}, "c": None}
    b = {"c": None, "a": {"x": "é", "y": [1.5, -0.0]}, "b": 1}
    assert canonical_json(a) == canonical_json(b) == '{"a":{"x":"é","y":[1.5,-0.0]},"b":1,"c":null}'.encode()


def test_canonical_json_rejects_nan():
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_round_trip_is_exact():
    r = make_receipt().seal()
    text = r.to_json()
    r2 = Receipt.from_json(text)
    assert r2 == r
    assert r2.to_json() == text
    assert r2.compute_hash() == r.compute_hash() == r.content_hash
    assert math.copysign(1.0, r2.output_logprobs[-1]) == -1.0  # -0.0 survives
    assert r2.output_logprobs[3] == -math.inf
    for row, row2 in zip(r.fingerprints, r2.fingerprints):
        assert [x.hex() for x in row] == [x.hex() for x in row2]
    assert r2.extra["nested"]["a"] == 5e-324
    assert r2.check_integrity() == []


def test_parsing_is_independent_of_key_order_and_whitespace():
    r = make_receipt().seal()
    doc = json.loads(r.to_json())
    items = list(doc.items())
    random.Random(0).shuffle(items)
    shuffled = json.dumps(dict(items), indent=3, ensure_ascii=True)
    r2 = Receipt.from_json(shuffled)
    assert r2.to_json() == r.to_json()
    assert r2.check_integrity() == []
    assert Receipt.from_json(r.to_json(indent=2)).to_json() == r.to_json()


def test_from_json_rejects_unknown_fields_schema_and_constants():
    doc = json.loads(make_receipt().seal().to_json())
    with pytest.raises(ValueError, match="unknown"):
        Receipt.from_json(json.dumps({**doc, "bonus": 1}))
    with pytest.raises(ValueError, match="schema"):
        Receipt.from_json(json.dumps({**doc, "schema": "ditto.receipt/v0"}))
    with pytest.raises(ValueError, match="constant"):
        Receipt.from_json(json.dumps(doc).replace('"-Infinity"', "-Infinity"))
    assert doc["schema"] == SCHEMA_VERSION


def test_receipt_validates_shapes():
    with pytest.raises(ValueError, match="fingerprints"):
        make_receipt(fingerprint_k=16)
    with pytest.raises(ValueError, match="output_logprobs"):
        make_receipt(output_logprobs=(0.0,))
    with pytest.raises(ValueError, match="non-finite"):
        make_receipt(extra={"x": math.inf})


# ------------------------------------------------------------------------------- tampering


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    else:
        yield path, obj


def _mutated(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return math.nextafter(value, math.inf)  # one ulp: exact floats matter
    if isinstance(value, str):
        return {"Infinity": "-Infinity", "-Infinity": "Infinity"}.get(value, value + "!")
    if value is None:
        return 0
    if value == []:
        return [0]
    raise AssertionError(value)


def _set(doc, path, value):
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


@pytest.mark.parametrize("signed", [False, True])
def test_every_field_edit_is_detected(signed, keys):
    priv, pub = keys
    r = make_receipt().seal(priv if signed else None)
    doc = json.loads(r.to_json())
    leaves = [(p, v) for p, v in _leaves(doc) if p[0] not in ("content_hash", "signature")]
    top_level = {p[0] for p, _ in leaves}
    assert top_level == {f.name for f in dataclasses.fields(Receipt)} - {"content_hash", "signature"}
    n_checked = 0
    for path, value in leaves:
        edited = json.loads(r.to_json())
        _set(edited, path, _mutated(value))
        try:
            r2 = Receipt.from_json(json.dumps(edited))
        except (ValueError, TypeError):
            continue  # an edit that breaks the schema is refused outright
        problems = r2.check_integrity(pub if signed else None)
        assert any("content hash mismatch" in p for p in problems), (path, problems)
        n_checked += 1
    assert n_checked > 60


def test_hash_and_signature_edits_are_detected(keys):
    priv, pub = keys
    r = make_receipt().seal(priv)
    assert r.check_integrity(pub) == []
    bad_hash = dataclasses.replace(r, content_hash="sha256:" + "0" * 64)
    assert any("mismatch" in p for p in bad_hash.check_integrity(pub))
    assert any("signature invalid" in p for p in bad_hash.check_integrity(pub))
    sig = bytearray(bytes.fromhex(r.signature))
    sig[0] ^= 1
    assert any("signature invalid" in p for p in dataclasses.replace(r, signature=sig.hex()).check_integrity(pub))
    # edit a field and recompute the hash, keeping the old signature: the signature no longer matches
    edited = dataclasses.replace(r, output_token_ids=(7, 8, 9, 10, 3), content_hash=None)
    edited = dataclasses.replace(edited, content_hash=edited.compute_hash())
    assert edited.check_integrity(pub) == ["signature invalid: it does not match the content hash and public key"]
    # edit and re-seal without a key: intact, but no longer signed by the expected key
    resealed = dataclasses.replace(r, output_token_ids=(7, 8, 9, 10, 3)).seal()
    assert resealed.check_integrity() == []
    assert any("not signed" in p for p in resealed.check_integrity(pub))
    assert any("not sealed" in p for p in make_receipt().check_integrity())


def test_signature_with_wrong_key_is_refused(keys, tmp_path):
    priv, pub = keys
    other_priv, other_pub = generate_keypair(tmp_path / "other")
    r = make_receipt().seal(priv)
    assert r.check_integrity() == []  # intact (embedded key)
    assert r.check_integrity(pub) == []
    assert r.check_integrity(load_public_key(pub)) == []
    assert r.check_integrity(r.public_key) == []
    assert r.check_integrity(other_pub) == ["receipt was signed by a different key than the one expected"]
    forged = make_receipt(output_token_ids=(1, 1, 1, 1, 1)).seal(other_priv)
    assert forged.check_integrity() == []  # self-consistent...
    assert forged.check_integrity(pub) != []  # ...but not by the key the verifier trusts


# ---------------------------------------------------------------------------------- keygen


def test_keygen_files_permissions_and_loading(tmp_path):
    priv, pub = generate_keypair(tmp_path / "sub" / "key")
    assert priv == tmp_path / "sub" / "key" and pub == tmp_path / "sub" / "key.pub"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    k = load_private_key(priv)
    assert public_key_hex(k) == public_key_hex(pub) == public_key_hex(pub.read_text())
    assert load_private_key(priv.read_bytes()).sign(b"x") == k.sign(b"x")  # Ed25519 is deterministic
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "sub" / "key")
    priv2, _ = generate_keypair(tmp_path / "sub" / "key", overwrite=True)
    assert public_key_hex(load_private_key(priv2)) != public_key_hex(k)
    assert stat.S_IMODE(os.stat(priv2).st_mode) == 0o600


def test_save_load_and_from_completion(tmp_path, keys):
    params = SamplingParams(temperature=0.5, seed=3)
    comp = CompletionOutput(index=2, text="hi", token_ids=[5, 6], logprobs=[-0.5, -0.25], finish_reason="length")
    req = RequestOutput(request_id="r", prompt="p", prompt_token_ids=[1, 2], outputs=[comp], finished=True)
    r = Receipt.from_completion(
        req, comp, params, model_digest="sha256:x", tokenizer_digest="sha256:y", numerics="fp32", determinism="fast"
    )
    assert r.sample_index == 2 and r.sampling["seed"] == 3 and r.sampling["processing_order"][0] == "repetition_penalty"
    assert r.fingerprints is None and r.output_logprobs == (-0.5, -0.25)
    r = r.seal(keys[0])
    r.save(tmp_path / "r.json")
    assert Receipt.load(tmp_path / "r.json") == r
    with pytest.raises(ValueError, match="seed"):
        Receipt.from_completion(
            req, comp, SamplingParams(temperature=1), model_digest="", tokenizer_digest="", numerics="", determinism=""
        )


def test_digest_files(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "b").write_bytes(b"world")
    one = digest_files([tmp_path / "a"])
    assert one == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert digest_files([tmp_path / "b", tmp_path / "a"]) == digest_files([tmp_path / "a", tmp_path / "b"]) != one


# ---------------------------------------------------------------------------------- claims


def test_parse_openai_completion_with_choices_and_logprobs():
    line = {
        "request": {"model": "m", "prompt": "2+2=", "temperature": 0.8, "seed": 5, "n": 2, "logprobs": 1,
                    "max_tokens": 4, "logit_bias": {"50": 10}},
        "response": {"id": "cmpl-1", "model": "m", "choices": [
            {"index": 0, "text": " 4", "finish_reason": "stop",
             "logprobs": {"tokens": [" 4"], "token_logprobs": [-0.01], "top_logprobs": [{" 4": -0.01}]}},
            {"index": 1, "text": " four", "token_ids": [11, 12], "finish_reason": "stop", "logprobs": None},
        ]},
    }  # fmt: skip
    claims = parse_claims([json.dumps(line)])
    assert [c.id for c in claims] == ["cmpl-1/0", "cmpl-1/1"]
    a, b = claims
    assert a.prompt == "2+2=" and a.output_text == " 4" and a.sample_index == 0 and a.model == "m"
    assert a.params.temperature == 0.8 and a.params.seed == 5 and a.params.logprobs == 1 and a.params.max_tokens == 4
    assert a.tokens == (" 4",) and a.logprobs == (-0.01,) and a.top_logprobs == ({" 4": -0.01},)
    assert a.unsupported == ("logit_bias",) and a.needs_tokenization
    # a saved response without ditto's extension is another engine's draw: its seed cannot be
    # replayed, so the claimed logprobs are the strongest check
    assert a.sampler == "other" and a.method == "logprobs"
    assert b.output_token_ids == (11, 12) and b.sample_index == 1 and not b.needs_tokenization


def test_llama_cpp_sampling_options_switched_off_are_not_flagged():
    """llama.cpp's server spells its options its own way: at their off value they change nothing and
    are not reported; at any other value ditto cannot replay them and says so."""
    request = {"model": "m", "prompt": "a", "temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    response = {"id": "c", "choices": [{"index": 0, "text": " b", "finish_reason": "length"}]}
    off, on = parse_claims(
        [json.dumps({"request": request | {"repeat_penalty": p}, "response": response}) for p in (1.0, 1.1)]
    )
    assert off.unsupported == () and on.unsupported == ("repeat_penalty",)
    assert off.params.top_k == 0 and off.params.top_p == 1.0 and off.params.min_p == 0.0


def test_parse_chat_and_flat_claims():
    chat = {
        "request": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                    "top_logprobs": 2, "top_p": 0.5},
        "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                  "logprobs": {"content": [{"token": "Hello", "logprob": -0.2, "bytes": [72],
                                                            "top_logprobs": [{"token": "Hello", "logprob": -0.2}]}]}}]},
    }  # fmt: skip
    flat = {"id": "x", "prompt_token_ids": [1, 2], "output_token_ids": [3, 4], "temperature": 0.0, "logprobs": [-1, -2]}
    text = "\n".join(["# comment", json.dumps(chat), "", json.dumps(flat)])
    c, f = parse_claims(text.splitlines())
    assert c.messages[0]["content"] == "hi" and c.output_text == "Hello" and c.params.top_p == 0.5
    assert c.params.logprobs == 2 and c.logprobs == (-0.2,) and c.method == "logprobs" and c.params.seed is None
    assert c.line == 2 and c.id == "line-2"
    assert f.id == "x" and f.prompt_token_ids == (1, 2) and f.output_token_ids == (3, 4)
    assert f.params.greedy and f.method == "greedy" and f.logprobs == (-1.0, -2.0) and f.line == 4


def test_bad_claims_name_the_line():
    with pytest.raises(ClaimError, match="line 2: not valid JSON"):
        parse_claims(['{"prompt": "a", "output": "b"}', "{oops"])
    with pytest.raises(ClaimError, match="line 1: no output"):
        parse_claims(['{"prompt": "a"}'])
    with pytest.raises(ClaimError, match="line 1: no prompt"):
        parse_claims(['{"output": "a"}'])
    with pytest.raises(ClaimError, match="line 1: temperature"):
        parse_claims(['{"prompt": "a", "output": "b", "temperature": -1}'])
