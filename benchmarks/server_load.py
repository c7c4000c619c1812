"""Loopback load test of `ditto serve`: many concurrent streaming chat requests against one server.

Usage: .venv/bin/python benchmarks/server_load.py [--model smollm2-135m-instruct] [--requests 200]
       [--max-tokens 16] [--determinism batch_invariant] [--url http://127.0.0.1:8000]

Starts `ditto serve` on 127.0.0.1 (a free port) in a subprocess unless --url names a running one,
then:
  1. reference: one non-streaming request per distinct prompt (same seed as the load);
  2. load: --requests streaming requests at once (prompts cycle over --distinct-prompts);
  3. checks: zero errors; per request the streamed token ids (the `ditto.token_ids` of each
     chunk) equal its receipt's output ids (no lost / duplicated tokens); in deterministic
     modes the streamed text and ids equal the non-streaming reference and every prompt has
     exactly 1 distinct output; prints throughput and p50/p99 latency / time to first token.
Everything is bounded: one deadline (--timeout) covers the whole run; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = [
    "What is 17 * 23?",
    "Name three prime numbers.",
    "Explain recursion in one sentence.",
    "Natalia sold clips to 48 friends in April and half as many in May. How many in total?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give a synonym for 'quick'.",
    "Count from one to five.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def _wait_up(url: str, deadline: float, proc) -> None:
    async with httpx.AsyncClient(timeout=2) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"server exited with code {proc.returncode}")
            try:
                if (await c.get(url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("server did not come up in time")


def _body(args, prompt: str, stream: bool) -> dict:
    return {
        "model": args.served_name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "stream": stream,
    }


async def _stream_one(c: httpx.AsyncClient, args, prompt: str) -> dict:
    t0 = time.perf_counter()
    rec = {"prompt": prompt, "text": "", "ids": [], "ttft": None, "error": None, "receipt_id": None}
    try:
        async with c.stream("POST", "/v1/chat/completions", json=_body(args, prompt, True)) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = chunk["error"]["message"]
                    break
                for ch in chunk["choices"]:
                    piece = ch["delta"].get("content") or ""
                    if piece and rec["ttft"] is None:
                        rec["ttft"] = time.perf_counter() - t0
                    rec["text"] += piece
                    rec["ids"] += chunk.get("ditto", {}).get("token_ids", [])
                    if ch.get("finish_reason"):
                        rec["receipt_id"] = chunk["ditto"]["receipt_id"]
    except httpx.HTTPError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["latency"] = time.perf_counter() - t0
    return rec


async def run(args, url: str) -> int:
    limits = httpx.Limits(max_connections=args.requests + 16, max_keepalive_connections=args.requests + 16)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = PROMPTS[: args.distinct_prompts]
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, headers=headers) as c:
        info = (await c.get("/v1/models")).json()["data"][0]
        determinism = info["ditto"]["determinism"]
        print(f"server: {info['id']}  numerics={info['ditto']['numerics']}  determinism={determinism}  "
              f"threads={info['ditto']['threads']}  max_num_seqs={info['ditto']['max_num_seqs']}")  # fmt: skip
        refs = {}
        for p in prompts:  # one at a time: the reference is each prompt alone in the batch
            r = await c.post("/v1/chat/completions", json=_body(args, p, False))
            r.raise_for_status()
            j = r.json()
            refs[p] = (j["choices"][0]["message"]["content"], j["ditto"]["choices"][0]["token_ids"])
        work = [prompts[i % len(prompts)] for i in range(args.requests)]
        t0 = time.perf_counter()
        recs = await asyncio.gather(*[_stream_one(c, args, p) for p in work])
        wall = time.perf_counter() - t0
        errors = [r for r in recs if r["error"]]
        lost = 0
        for r in recs:
            if r["error"]:
                continue
            rc = await c.get(f"/v1/receipts/{r['receipt_id']}")
            if rc.status_code != 200 or rc.json()["output_token_ids"] != r["ids"]:
                lost += 1
        metrics = (await c.get("/metrics")).text
    ok = [r for r in recs if not r["error"]]
    deterministic = determinism in ("batch_invariant", "exact")
    mismatch = sum(1 for r in ok if (r["text"], r["ids"]) != refs[r["prompt"]])
    distinct = {p: len({tuple(r["ids"]) for r in ok if r["prompt"] == p}) for p in prompts}
    tokens = sum(len(r["ids"]) for r in ok)
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    print(f"requests: {len(recs)} concurrent streaming, max_tokens={args.max_tokens}, {len(prompts)} distinct prompts")
    print(f"errors: {len(errors)}" + (f"  (first: {errors[0]['error']})" if errors else ""))
    print(f"streams whose token ids differ from their receipt (lost/duplicated tokens): {lost}")
    print(f"streams that differ from the non-streaming reference: {mismatch}")
    print(f"distinct outputs per identical request: {sorted(distinct.values())}")
    print(f"wall {wall:.2f} s   {len(ok) / wall:.2f} req/s   {tokens / wall:.1f} generated tok/s ({tokens} tokens)")
    print(f"latency p50 {_pct(lat, 0.5):.2f} s  p99 {_pct(lat, 0.99):.2f} s   "
          f"TTFT p50 {_pct(ttft, 0.5):.2f} s  p99 {_pct(ttft, 0.99):.2f} s")  # fmt: skip
    for line in metrics.splitlines():
        if line.startswith(("ditto_engine_steps_total", "ditto_requests_rejected_total", "ditto_requests_aborted")):
            print("server metric:", line)
    failed = bool(errors) or lost > 0
    if deterministic:
        failed |= mismatch > 0 or any(v != 1 for v in distinct.values())
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--numerics", default="fp32")
    ap.add_argument("--determinism", default="batch_invariant", choices=["fast", "batch_invariant", "exact"])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--distinct-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--timeout", type=float, default=900, help="deadline for the whole run (s)")
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--served-name", default="bench")
    args = ap.parse_args()
    if args.requests < 1 or args.requests > 2000:
        raise SystemExit("--requests must be in [1, 2000]")
    deadline = time.monotonic() + args.timeout
    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "ditto.cli", "serve", "--model", args.model, "--numerics", args.numerics,
               "--determinism", args.determinism, "--port", str(port), "--host", "127.0.0.1",
               "--served-model-name", args.served_name, "--max-num-seqs", str(args.max_num_seqs),
               "--log-level", "warning", "--max-queue", str(args.requests + 64)]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.Popen(cmd, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    try:

        async def go():
            await _wait_up(url, deadline, proc)
            return await asyncio.wait_for(run(args, url), timeout=max(1.0, deadline - time.monotonic()))

        return asyncio.run(go())
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
