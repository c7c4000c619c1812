"""`ditto serve`: the OpenAI-compatible API, driven by the official openai client over loopback."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import openai
import pytest
from http_server import free_port, serve_in_thread

from ditto import LLM, SamplingParams
from ditto.server.app import create_app
from ditto.verify.receipt import generate_keypair

API_KEY = "test-key-123"
MODEL = "tiny"
RECEIPTS: list[str] = []  # receipt ids handed out during the tests, verified at the end


class _Server:
    """uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.app = app
        self.server, self.thread = serve_in_thread(app, self.port, log_level="warning")
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.app.state.ditto.llm.engine

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("keys") / "server.pem")


@pytest.fixture(scope="module")
def server(tiny_llama, keys):
    llm = LLM(
        str(tiny_llama), determinism="batch_invariant", progress=False, max_num_seqs=64, max_num_batched_tokens=512
    )
    srv = _Server(create_app(llm, served_name=MODEL, api_key=API_KEY, sign_key=keys[0], max_body_bytes=64 << 10))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(str(tiny_llama), determinism="batch_invariant", progress=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _ditto(obj) -> dict:
    return obj.model_extra["ditto"]


def test_models_health_auth_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert API_KEY not in r.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="The quick", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("ditto_http_requests_total", "ditto_queue_depth", "ditto_running_sequences",
                 "ditto_request_latency_seconds_bucket", "ditto_generation_tokens_total"):  # fmt: skip
        assert name in text


def test_completions_stream_equals_nonstream(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=20, temperature=0.9, seed=7, n=2, logprobs=2)
    kw["extra_body"] = {"ignore_eos": True, "top_k": 50}
    full = client.completions.create(**kw)
    assert len(full.choices) == 2 and full.usage.completion_tokens == 40
    d = _ditto(full)
    assert d["seed"] == 7 and d["determinism"] == "batch_invariant"
    texts, ids = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            ids[ch.index] += _ditto(chunk)["token_ids"]
            if ch.finish_reason:
                RECEIPTS.append(_ditto(chunk)["receipt_id"])
    for c, dc in zip(full.choices, d["choices"]):
        assert texts[c.index] == c.text
        assert ids[c.index] == dc["token_ids"] and len(dc["token_ids"]) == 20
        assert len(c.logprobs.token_logprobs) == 20 and all(len(t) == 2 for t in c.logprobs.top_logprobs)
        RECEIPTS.append(dc["receipt_id"])
    assert d["choices"][0]["token_ids"] != d["choices"][1]["token_ids"]  # different sample indices


def test_chat_stream_nonstream_n_and_stop(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 plus 30?"}]
    kw = dict(
        model=MODEL, messages=messages, max_tokens=24, temperature=1.0, seed=11, n=3, logprobs=True, top_logprobs=1
    )
    full = client.chat.completions.create(**kw, extra_body={"ditto_receipt": True})
    assert len(full.choices) == 3 and all(c.message.role == "assistant" for c in full.choices)
    for c, dc in zip(full.choices, _ditto(full)["choices"]):
        assert dc["receipt"]["output_token_ids"] == dc["token_ids"] and dc["receipt"]["signature"]
        assert len(c.logprobs.content) == len(dc["token_ids"])
    streamed = {i: "" for i in range(3)}
    finish = {}
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if not chunk.choices:
            assert chunk.usage.completion_tokens == full.usage.completion_tokens
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert streamed == {c.index: c.message.content for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    # a stop string cuts the text (stream and not) at the same place
    text = full.choices[0].message.content
    if len(text) > 6:
        stop = text[3:6]
        kw.update(n=1, stop=[stop])
        cut = client.chat.completions.create(**kw)
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content
        s = "".join(
            ch.delta.content or "" for k in client.chat.completions.create(stream=True, **kw) for ch in k.choices
        )
        assert s == cut.choices[0].message.content


def test_batch_invariant_under_load(server, offline):
    """A request's tokens and logprobs are bit-identical to offline LLM.generate while 30 others run."""
    rng = random.Random(0)
    vocab = offline.loaded.config.vocab_size
    target = [rng.randrange(3, vocab) for _ in range(37)]
    params = dict(max_tokens=24, temperature=0.8, top_p=0.95, seed=5)

    async def go():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

        async def other(i):
            p = [rng.randrange(3, vocab) for _ in range(rng.randrange(5, 120))]
            s = rng.random() < 0.5
            r = await c.completions.create(
                model=MODEL, prompt=p, max_tokens=rng.randrange(5, 60), temperature=0.7, seed=i, stream=s
            )
            if s:
                async for _ in r:
                    pass

        others = [asyncio.create_task(other(i)) for i in range(30)]
        await asyncio.sleep(0.05)
        got = await c.completions.create(
            model=MODEL, prompt=target, logprobs=0, extra_body={"ignore_eos": True}, **params
        )
        await asyncio.gather(*others)
        await c.close()
        return got

    got = asyncio.run(go())
    ref = offline.generate([target], SamplingParams(ignore_eos=True, **params))[0].outputs[0]
    assert _ditto(got)["choices"][0]["token_ids"] == ref.token_ids
    assert got.choices[0].logprobs.token_logprobs == ref.logprobs  # bit for bit (JSON floats round-trip)
    assert got.choices[0].text == ref.text
    RECEIPTS.append(_ditto(got)["choices"][0]["receipt_id"])


BAD = [
    ("malformed json", b'{"model": "tiny", "prompt": ', 400),
    ("not an object", b"[1, 2]", 400),
    ("wrong type", {"model": MODEL, "prompt": "hi", "max_tokens": "10"}, 400),
    ("unknown field", {"model": MODEL, "prompt": "hi", "temprature": 0.5}, 400),
    ("unknown model", {"model": "gpt-4", "prompt": "hi"}, 404),
    ("prompt too long", {"model": MODEL, "prompt": [5] * 600}, 400),
    ("token outside vocab", {"model": MODEL, "prompt": [5, 99999]}, 400),
    ("negative max_tokens", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400),
    ("absurd max_tokens", {"model": MODEL, "prompt": "hi", "max_tokens": 10**9}, 400),
    ("temperature too low", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400),
    ("temperature too high", {"model": MODEL, "prompt": "hi", "temperature": 1e6}, 400),
    ("top_p zero", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400),
    ("n zero", {"model": MODEL, "prompt": "hi", "n": 0}, 400),
    ("logprobs too many", {"model": MODEL, "prompt": "hi", "logprobs": 50}, 400),
    ("invalid utf-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400),
    ("lone surrogate", b'{"model": "tiny", "prompt": "\\ud800"}', 400),
    ("NaN", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400),
    ("oversized body", {"model": MODEL, "prompt": "x" * (70 << 10)}, 413),
    ("empty messages", {"model": MODEL, "messages": []}, 400),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
]


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, client, name, body, status):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    ok = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=4)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_disconnect_mid_stream_frees_blocks(server):
    eng = server.engine
    body = {"model": MODEL, "prompt": "Let's think step by step.", "max_tokens": 400, "stream": True, "n": 2}
    body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    _wait_all_free(eng)
    assert _aborted(server) == 1
    body.update(stream=False, max_tokens=500)  # a non-streaming client that gives up is noticed too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.3)
    _wait_all_free(eng)
    assert _aborted(server) == 2


def _aborted(server) -> int:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("ditto_requests_aborted_total"):
            return int(float(line.split()[-1]))
    return 0


def _wait_all_free(eng, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while eng.blocks.num_free != eng.blocks.num_blocks or eng.requests:
        assert time.monotonic() < deadline, (eng.blocks.num_free, eng.blocks.num_blocks, list(eng.requests))
        time.sleep(0.05)


def test_receipts_verify_exact(server, client, keys):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    pub = keys[1].read_text()
    assert len(RECEIPTS) >= 5
    for rid in RECEIPTS:
        r = httpx.post(server.url + "/v1/verify", json={"receipt_id": rid}, headers=headers, timeout=60)
        assert r.status_code == 200 and r.json()["verdict"] == "exact", r.text
    doc = httpx.get(server.url + f"/v1/receipts/{RECEIPTS[0]}", headers=headers).json()
    r = httpx.post(server.url + "/v1/verify", json={"receipt": doc, "public_key": pub}, headers=headers, timeout=60)
    v = r.json()
    assert v["verdict"] == "exact" and v["signed"] and not v["tampered"] and not v["notes"]
    forged = dict(doc, output_token_ids=[(doc["output_token_ids"][0] + 1) % 384] + doc["output_token_ids"][1:])
    v = httpx.post(server.url + "/v1/verify", json={"receipt": forged}, headers=headers, timeout=60).json()
    assert v["verdict"] == "inconsistent" and v["tampered"]
    assert all(rid.startswith("sha256:") and len(rid) == 71 for rid in RECEIPTS)
    assert httpx.get(server.url + "/v1/receipts/sha256:" + "0" * 64, headers=headers).status_code == 404
    assert httpx.get(server.url + "/v1/receipts/nope", headers=headers).status_code == 400  # not a receipt id


def test_queue_limit_gives_429(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False, max_num_seqs=1)
    srv = _Server(create_app(llm, served_name=MODEL, max_queue=1))
    try:
        body = {"model": MODEL, "prompt": "Natalia sold clips", "max_tokens": 30, "ignore_eos": True}

        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                rs = await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(12)])
                after = await c.post("/v1/completions", json=body)
            return rs, after

        rs, after = asyncio.run(go())
        codes = [r.status_code for r in rs]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        assert next(r for r in rs if r.status_code == 429).json()["error"]["type"] == "rate_limit_error"
        assert after.status_code == 200
    finally:
        srv.close()
