"""The `openai` backend against a real `ditto serve` (uvicorn on loopback, batch_invariant).

Covers: generation and eval equal to the in-process engine bit for bit, scoring through echo and a
scoring strategy, a server killed mid-run (the run resumes, nothing lost or counted twice), 429s
and timeouts retried by a small real HTTP proxy, a server without scoring refused before any work,
and the CLI's flag checks.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from http_server import free_port, serve_in_thread

from ditto import LLM, SamplingParams
from ditto.backends.openai import OpenAIBackend, RetryPolicy, ScoringUnavailable, ServerUnavailable
from ditto.eval.runner import EvalConfig, load_results, run_eval
from ditto.eval.strategy_runner import StrategySpec, run_strategy_eval
from ditto.server.app import create_app

MODEL = "tiny"
FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.02, max_backoff_s=0.1)
CFG = dict(task="arith", limit=6, n=2, temperature=0.8, seed=3, max_tokens=10, batch_problems=3, grader_workers=1)


def _llm(path) -> LLM:
    return LLM(str(path), determinism="batch_invariant", progress=False, max_num_seqs=32, max_num_batched_tokens=256)


class _Server:
    """`ditto serve`'s app under uvicorn on 127.0.0.1 in a thread. With `die_after=K`, the (K+1)-th
    completion request kills it: the port closes and requests in flight get no answer."""

    def __init__(self, llm, die_after: int | None = None):
        self.app = create_app(llm, served_name=MODEL)
        self.completions, self.die_after = 0, die_after
        self.port = free_port()
        self.server, self.thread = serve_in_thread(self._asgi, self.port, log_level="error", interface="asgi3")
        self.url = f"http://127.0.0.1:{self.port}/v1"

    async def _asgi(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            self.completions += 1
            if self.die_after is not None and self.completions > self.die_after:
                self.server.should_exit = self.server.force_exit = True  # killed: no answer, port closed
                await asyncio.sleep(3600)
        await self.app(scope, receive, send)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.app.state.ditto.loop.stop()


class _Proxy:
    """A real HTTP server in front of `upstream` that misbehaves on purpose: answers the first
    `fail` completion requests (counted in `seen`) with `status`, or stalls `stall_s` seconds
    first; with `no_scoring` it answers 400 to echo / prompt_logprobs, as a server without them."""

    def __init__(self, upstream: str, no_scoring: bool = False):
        self.upstream, self.no_scoring = upstream, no_scoring
        self.seen, self.fail, self.status, self.stall_s = 0, 0, 429, 0.0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, status: int, body: bytes, headers=()) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                r = httpx.get(proxy.upstream + self.path.removeprefix("/v1"))
                self._answer(r.status_code, r.content)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                if proxy.no_scoring and (body.get("echo") or "prompt_logprobs" in body):
                    err = {"error": {"message": "echo is not supported", "type": "invalid_request_error"}}
                    return self._answer(400, json.dumps(err).encode())
                proxy.seen += 1
                if proxy.seen <= proxy.fail:
                    if proxy.stall_s:
                        time.sleep(proxy.stall_s)
                    else:
                        err = json.dumps({"error": {"message": "slow down", "type": "rate_limit_error"}}).encode()
                        return self._answer(proxy.status, err, [("Retry-After", "0")])
                r = httpx.post(proxy.upstream + self.path.removeprefix("/v1"), content=raw, timeout=60)
                self._answer(r.status_code, r.content)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tiny_llama):
    srv = _Server(_llm(tiny_llama))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def local(tiny_llama):
    return _llm(tiny_llama)


@pytest.fixture(scope="module")
def remote(served, tiny_llama):
    b = OpenAIBackend(served.url, tokenizer=str(tiny_llama), retry=FAST_RETRY)
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference_run(local, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_eval(local, EvalConfig(**CFG), out, progress=False, report=False)
    return load_results(out / "results.jsonl")


def _same_records(a: list[dict], b: list[dict]) -> None:
    drop = {"seconds", "backend_metrics"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def test_probe_and_manifest(remote, local):
    caps = remote.caps
    assert caps.ditto and caps.prompt_ids and caps.token_id_names and caps.scoring == "echo"
    info = remote.info()
    assert info["model"] == MODEL and info["model_digest"] == local.model_digest
    assert info["system_fingerprint"].startswith("ditto-") and info["determinism"] == "batch_invariant"
    assert info["server_version"].startswith("ditto") and "server" in info["server_headers"]


def test_generate_bit_identical(remote, local):
    prompts = [local.chat_prompt([{"role": "user", "content": q}]) for q in ("What is 3+4?", "Name a colour.")]
    params = [SamplingParams(n=2, temperature=0.8, seed=s, max_tokens=12, logprobs=3) for s in (1, 2)]
    params.append(SamplingParams(temperature=0.0, max_tokens=12, logprobs=0))
    prompts.append(local.encode("The quick brown fox"))  # token-id prompt, greedy
    got, want = remote.generate(prompts, params), local.generate(prompts, params)
    for g, w in zip(got, want):
        assert g.prompt_token_ids == w.prompt_token_ids
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert gc.token_ids == wc.token_ids and gc.text == wc.text
            assert gc.logprobs == wc.logprobs  # exact float equality
            assert (gc.top_logprobs or None) == (wc.top_logprobs or None)
            assert gc.finish_reason == wc.finish_reason and gc.index == wc.index


def test_eval_equals_in_process(remote, reference_run, tmp_path):
    run_eval(remote, EvalConfig(**CFG), tmp_path, progress=False, report=False)
    _same_records(load_results(tmp_path / "results.jsonl"), reference_run)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backend"]["backend"] == "openai" and manifest["backend"]["system_fingerprint"]


def test_server_killed_mid_run_resumes(tiny_llama, reference_run, tmp_path):
    dying = _Server(_llm(tiny_llama))
    backend = OpenAIBackend(dying.url, tokenizer=str(tiny_llama), retry=FAST_RETRY)
    dying.die_after = dying.completions + 3  # after the probes: batch 1 (3 problems) answered, then killed
    with pytest.raises(ServerUnavailable, match="no answer after 3 attempts"):
        run_eval(backend, EvalConfig(**CFG), tmp_path, progress=False, report=False)
    backend.close()
    dying.close()
    assert len(load_results(tmp_path / "results.jsonl")) == 3
    fresh = _Server(_llm(tiny_llama))
    try:
        backend = OpenAIBackend(fresh.url, tokenizer=str(tiny_llama), retry=FAST_RETRY)
        run_eval(backend, EvalConfig(**CFG), tmp_path, progress=False, report=False)
        backend.close()
    finally:
        fresh.close()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(line)["id"] for line in lines}) == CFG["limit"]  # none twice
    _same_records(load_results(tmp_path / "results.jsonl"), reference_run)
    sessions = json.loads((tmp_path / "manifest.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_with"] == 3


def test_score_and_scoring_strategy(remote, local, tmp_path):
    prompt = local.chat_prompt([{"role": "user", "content": "What is 2+2?"}])
    got, want = remote.score(prompt, " It is 4."), local.score(prompt, " It is 4.")
    assert got.token_ids == want.token_ids and got.top_ids == want.top_ids
    assert got.logprobs == want.logprobs  # exact: echo scores in the engine, as in-process
    spec = StrategySpec(name="best_of_n", budget=24, args={"n": 2, "scorer": "self"})
    cfg = EvalConfig(**(CFG | {"limit": 2, "max_tokens": 12}))
    summary = run_strategy_eval(remote, cfg, spec, tmp_path / "remote", progress=False, report=False)
    run_strategy_eval(local, cfg, spec, tmp_path / "local", progress=False, report=False)
    recs, want = (load_results(tmp_path / d / "results.jsonl") for d in ("remote", "local"))
    assert summary["problems"] == 2 and all(r["cost"]["scored_tokens"] > 0 for r in recs)
    assert {c["op"] for r in recs for c in r["calls"]} == {"generate", "score"}
    assert sorted((r["id"], r["samples"], r["calls"]) for r in recs) == sorted(
        (r["id"], r["samples"], r["calls"]) for r in want
    )


def test_server_echo_scores_the_prompt(served, local):
    ids = local.encode("The quick brown fox")
    body = {"model": MODEL, "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 2}
    r = httpx.post(served.url + "/completions", json=body | {"return_tokens_as_token_ids": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in ids] and r["usage"]["completion_tokens"] == 0
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == local.score(ids[:1], ids[1:]).logprobs
    assert lp["top_logprobs"][0] is None and all(len(d) == 2 for d in lp["top_logprobs"][1:])
    assert r["ditto"]["choices"][0]["prompt_top_ids"][1:] == local.score(ids[:1], ids[1:]).top_ids
    for bad in ({"max_tokens": 4}, {"stream": True}, {"n": 2}):
        err = httpx.post(served.url + "/completions", json=body | bad)
        assert err.status_code == 400 and "echo" in err.json()["error"]["message"] + str(bad)


def test_429_and_timeouts_are_retried(served, tiny_llama):
    params = SamplingParams(temperature=0.0, max_tokens=5)
    want = None
    # timeouts far from the answer time of a loaded 2-core CI machine: only the stall may time out
    for kw, retry, timeout_s in (
        (dict(fail=2, status=429), FAST_RETRY, 30.0),
        (dict(fail=1, status=503), FAST_RETRY, 30.0),
        (dict(fail=1, stall_s=6.0), FAST_RETRY, 3.0),
    ):
        proxy = _Proxy(served.url)
        b = OpenAIBackend(proxy.url, tokenizer=str(tiny_llama), retry=retry, timeout_s=timeout_s)
        proxy.seen, proxy.fail = 0, kw["fail"]
        proxy.status, proxy.stall_s = kw.get("status", 429), kw.get("stall_s", 0.0)
        (out,) = b.generate(["The quick brown fox"], params)
        assert b.http.retries == kw["fail"] and proxy.seen == kw["fail"] + 1
        want = want or out.token_ids
        assert out.token_ids == want
        b.close()
        proxy.close()
    proxy = _Proxy(served.url)
    b = OpenAIBackend(proxy.url, tokenizer=str(tiny_llama), retry=FAST_RETRY)
    proxy.seen, proxy.fail = 0, 99
    with pytest.raises(ServerUnavailable, match=r"no answer after 3 attempts; last: HTTP 429: slow down"):
        b.generate(["The quick brown fox"], params)
    assert proxy.seen == 3
    b.close()
    proxy.close()


def test_server_without_scoring_refused_before_work(served, tiny_llama, tmp_path):
    proxy = _Proxy(served.url, no_scoring=True)
    b = OpenAIBackend(proxy.url, tokenizer=str(tiny_llama), retry=FAST_RETRY)
    assert not b.can_score and b.caps.scoring_error and "echo" in b.caps.scoring_error
    with pytest.raises(ScoringUnavailable, match="cannot score .*neither `echo` with `logprobs` nor vLLM's"):
        b.score("2+2=", "4")
    spec = StrategySpec(name="best_of_n", budget=24, args={"n": 2, "scorer": "self"})
    seen = proxy.seen
    with pytest.raises(ScoringUnavailable):
        run_strategy_eval(b, EvalConfig(**(CFG | {"limit": 2})), spec, tmp_path / "run", progress=False)
    assert proxy.seen == seen and not (tmp_path / "run" / "results.jsonl").exists()  # nothing was sent or written
    b.close()
    proxy.close()


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "--base-url: --backend openai needs the server's URL"),
        (["--base-url", "ftp://example.org"], "--base-url: must be an http(s):// URL with a host"),
        (["--base-url", "http://127.0.0.1:8000", "--served-model", " "], "--served-model: must be a non-empty"),
        (["--base-url", "http://127.0.0.1:8000", "--max-concurrency", "0"], "--max-concurrency: must be a positive"),
        (["--base-url", "http://h:1", "--second-model", "x"], "--second-model: not with --backend openai"),
    ],
)
def test_cli_flags_checked_before_anything_loads(flags, message, tiny_llama, capsys, tmp_path):
    from ditto.cli import main

    argv = ["eval", "--backend", "openai", "--model", str(tiny_llama), "--task", "arith", "--out", str(tmp_path)]
    assert main(argv + flags) == 2
    assert message in capsys.readouterr().err


def test_base_url_only_with_openai(tiny_llama, capsys, tmp_path):
    from ditto.cli import main

    argv = ["eval", "--model", str(tiny_llama), "--task", "arith", "--base-url", "http://x", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--base-url: only for the openai backend (this run uses ditto)" in capsys.readouterr().err


def test_repro_config_through_the_server(served, tiny_llama, tmp_path, capsys):
    from ditto.cli import main
    from ditto.repro.runner import RunConfig, Workload, load_config_results, run_config

    work = Workload(model=str(tiny_llama), task="arith", limit=4, max_tokens=8, temperature=0.8, seed=1)
    work.prepare()
    remote_cfg = RunConfig.parse("openai:-:-:4", 1)
    assert (remote_cfg.numerics, remote_cfg.determinism) == ("server", "server")
    opts = {"max_num_batched_tokens": 256, "openai": {"base_url": served.url, "retry": FAST_RETRY}}
    man = run_config(remote_cfg, work, tmp_path, opts)
    assert man["backend_info"]["system_fingerprint"].startswith("ditto-")
    run_config(RunConfig.parse("ditto:fp32:batch_invariant:2", 1), work, tmp_path, opts)
    got, want = (
        load_config_results(tmp_path / "configs" / n) for n in (remote_cfg.name, "ditto-fp32-batch_invariant-b2-t1")
    )
    assert [r["token_ids"] for r in got.values()] == [r["token_ids"] for r in want.values()]
    argv = [
        "repro",
        "--model",
        str(tiny_llama),
        "--task",
        "arith",
        "--backends",
        "ditto,openai",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2 and "--base-url: --backend openai needs" in capsys.readouterr().err


def test_repro_cli_with_named_servers(served, tiny_llama, tmp_path, capsys):
    """--server LABEL=URL: the openai config's numerics slot names the server; its outputs sit beside ditto's."""
    from ditto.cli import main
    from ditto.repro.runner import load_config_results

    base = ["repro", "--model", str(tiny_llama), "--task", "arith", "--limit", "3", "--max-tokens", "6"]
    base += ["--threads", "1", "--no-progress", "--out", str(tmp_path)]
    for flags, message in [
        (["--server", "tiny"], "--server: must be LABEL=URL"),
        (["--server", "a:b=http://h:1"], "--server: must be LABEL=URL"),
        (["--server", "t=ftp://h"], "--base-url: must be an http(s):// URL"),
        (["--server", f"t={served.url}", "--configs", "openai:other:-:2"], "--configs: must be openai:LABEL"),
    ]:
        assert main(base + flags) == 2
        assert message in capsys.readouterr().err
    configs = "openai:tiny:-:2,ditto:fp32:batch_invariant:2:1"
    argv = base + ["--server", f"tiny={served.url}", "--configs", configs, "--no-matrix", "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    study = json.loads((tmp_path / "study.json").read_text())
    assert [c["name"] for c in study["configs"]] == ["openai-tiny-server-b2-t1", "ditto-fp32-batch_invariant-b2-t1"]
    got, want = (load_config_results(tmp_path / "configs" / c["name"]) for c in study["configs"])
    assert [r["token_ids"] for r in got.values()] == [r["token_ids"] for r in want.values()]
    # the matrix form: --backends openai runs one config per named server (no --base-url needed)
    argv = base + ["--server", f"tiny={served.url}", "--backends", "openai", "--batch-sizes", "1"]
    assert main(argv) == 0
    study = json.loads((tmp_path / "study.json").read_text())
    assert [c["name"] for c in study["configs"]] == ["openai-tiny-server-b1-t1"]


def test_ditto_eval_cli_through_the_server(served, tiny_llama, tmp_path, capsys):
    from ditto.cli import main

    argv = ["eval", "--backend", "openai", "--base-url", served.url, "--model", str(tiny_llama), "--task", "arith"]
    argv += ["--limit", "2", "--max-tokens", "6", "--grader-workers", "1", "--no-progress", "--json"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == 2
    backend = json.loads((tmp_path / "manifest.json").read_text())["backend"]
    assert backend["backend"] == "openai" and backend["server_model_card"]["id"] == MODEL
