"""Verify what other engines served: vLLM (CPU build, fp32 and bf16) and llama.cpp (Q4_1) against
ditto's fp32 reference, through `ditto verify --from-openai`'s code path.

    nice -n 19 .venv/bin/python benchmarks/verify_claims_peers.py --n 16 --tokens 64 [--out result.json]

Each server is started here, answers N /v1/completions requests per configuration (the chat
template rendered by ditto's tokenizer, logprobs on, EOS ignored where the server allows it, seed i
for request i), is stopped, and the saved {request, response} exchanges are verified in this
process against the bundled model in ditto's fp32 (`ditto.verify.replay.verify_claims`).

Configurations (what each should show):
  vllm-fp32  T=0.7       honest, same numerics: consistent (another engine's seed: logprobs + sampler z)
  vllm-fp32  T=0         honest greedy: consistent (rank check + logprobs)
  vllm-fp32  hot         served at T=1.2, claimed T=0.7: wrong sampler, caught by the z-test
  vllm-fp32  greedy-as-T1 served greedy, claimed T=1: wrong sampler, caught by the z-test
  vllm-bf16  T=0.7       lower precision: caught by the logprob comparison
  llama.cpp  T=0.7       Q4_1 weights (and llama.cpp's quantised matmuls): caught by logprobs
and the lower-precision rows again against a reference of their own class (ditto bf16 for vLLM bf16;
ditto's gguf mode, the file's own Q4_1 blocks, for llama.cpp): how far an honest same-class answer sits.
The table gives, per configuration and for the first n tokens of each response only (n = 1, 3,
10, 30, ... up to --tokens), the fraction of responses flagged `inconsistent` (for the honest rows
that is the false-positive rate), as benchmarks/verify_detection.py does for receipts.

Servers: vLLM from .venv-vllm (`python -m vllm.entrypoints.openai.api_server` on an HF folder
exported by benchmarks/export_hf.py); it takes ~100 s to start on a small CPU and its workers keep
the cores busy (spinning) while it runs, so nothing else here should be timed meanwhile. llama.cpp
is llama-cpp-python's server (`python -m llama_cpp.server`) from .venv, skipped with the reason
printed when it does not import. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from peer_servers import Server, llamacpp_server, vllm_server  # noqa: E402

HONEST = {
    "vllm-fp32 T=0.7",
    "vllm-fp32 T=0",
    "vllm-bf16 T=0.7 vs bf16 ref",
    "llama.cpp Q4_1 T=0.7 vs gguf ref",
    "llama.cpp Q4_1 T=0.7 vs gguf ref, fp16 KV",
}
# the same answers judged again against the reference of their own numerics class: ditto bf16 for vLLM bf16,
# ditto's gguf mode (the file's own Q4_1 blocks) for llama.cpp
OWN_CLASS = {"vllm-bf16 T=0.7": "bf16", "llama.cpp Q4_1 T=0.7": "gguf"}


def collect(srv: Server, prompts: list[str], served_t: float, claimed_t: float, tokens: int, vllm: bool) -> list:
    """One {request, response} per prompt; the saved request states `claimed_t` (a lie when it differs)."""
    out = []
    for i, prompt in enumerate(prompts):
        body = {"model": srv.model, "prompt": prompt, "max_tokens": tokens, "temperature": served_t, "seed": i}
        body["logprobs"] = 1
        if vllm:
            body.update(ignore_eos=True, return_token_ids=True)
        else:  # llama-cpp-python's server samples with top_k 40, top_p 0.95, min_p 0.05 and repeat_penalty 1.1
            # unless told otherwise: plain temperature sampling is what the claim states
            body.update(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        out.append({"request": dict(body, temperature=claimed_t), "response": r.json()})
    return out


def truncate(claim, n: int):
    """The claim as if the response had stopped after n tokens (None when it has no token boundaries)."""
    if claim.output_token_ids is not None:
        ids = claim.output_token_ids[:n]
        text = None
    elif claim.tokens is not None:
        ids, text = None, "".join(claim.tokens[:n])
    else:
        return None
    return dataclasses.replace(
        claim,
        output_token_ids=ids,
        output_text=text,
        tokens=claim.tokens[:n] if claim.tokens else None,
        logprobs=claim.logprobs[:n] if claim.logprobs else None,
        top_logprobs=claim.top_logprobs[:n] if claim.top_logprobs else None,
    )


def verify_config(ref, exchanges: list[dict], ns: list[int]) -> dict:
    from ditto.verify.claims import parse_claims
    from ditto.verify.claims_summary import summarize
    from ditto.verify.replay import verify_claims

    claims = parse_claims([json.dumps(x) for x in exchanges], openai=True)
    t0 = time.perf_counter()
    verdicts = verify_claims(ref, claims)
    secs = time.perf_counter() - t0
    docs = [{"file": c.id, **v.to_dict()} for c, v in zip(claims, verdicts)]
    rates = {}
    for n in ns:
        cut = [t for c in claims if (t := truncate(c, n)) is not None]
        if cut:
            rates[n] = sum(v.status == "inconsistent" for v in verify_claims(ref, cut)) / len(cut)
    gaps = [f["score"] for d in docs for f in d["fields"] if f["field"] == "output_logprobs"]
    zs = [f["score"] for d in docs for f in d["fields"] if f["field"] == "sampling"]
    notes = sorted({n for d in docs for n in d["notes"] if "round-trip" in n or "do not" in n})
    return {
        "summary": summarize(docs),
        "flagged_at_tokens": rates,
        "mean_logprob_gap": sum(gaps) / len(gaps) if gaps else None,
        "max_abs_z": max((abs(z) for z in zs), default=None),
        "tokens": sum(v.n_tokens for v in verdicts),
        "verify_s": secs,
        "notes": notes[:5],
        "results": docs,
    }


def print_table(rows: dict, ns: list[int]) -> None:
    head = f"{'config':34} {'n':>3} {'ok':>3} {'incons':>6} {'logprob gap':>11} {'|z| max':>7}  " + " ".join(
        f"@{n:<4}" for n in ns
    )
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in rows.items():
        if "skipped" in r:
            print(f"{name:34} skipped: {r['skipped']}")
            continue
        s = r["summary"]
        gap = f"{r['mean_logprob_gap']:.3g}" if r["mean_logprob_gap"] is not None else "-"
        z = f"{r['max_abs_z']:.2f}" if r["max_abs_z"] is not None else "-"
        rates = " ".join(f"{r['flagged_at_tokens'].get(n, float('nan')):5.2f}" for n in ns)
        kind = "FPR" if name in HONEST else "TPR"
        print(
            f"{name:34} {s['n']:>3} {s['ok']:>3} {s['counts'].get('inconsistent', 0):>6} {gap:>11} {z:>7}  "
            f"{rates}  ({kind})"
        )
    print("@n: fraction flagged inconsistent using each response's first n tokens only")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled name or a .gguf file")
    ap.add_argument("--n", type=int, default=16, help="responses per configuration")
    ap.add_argument("--tokens", type=int, default=64, help="max tokens per response")
    ap.add_argument("--threads", type=int, default=2, help="threads for each server and the reference")
    ap.add_argument("--skip", default="", help="comma-separated: vllm-fp32, vllm-bf16, llama.cpp")
    ap.add_argument("--out", default=None, help="write every exchange's verdict and the table here (JSON)")
    args = ap.parse_args()
    import torch
    from export_hf import export

    from ditto import LLM
    from ditto.loader.registry import resolve_model
    from ditto.verify.cli import _CAL_PROMPTS

    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    ns = [n for n in (1, 3, 10, 30, 100, 300) if n < args.tokens] + [args.tokens]
    ref = LLM(args.model, numerics="fp32", progress=False)  # the reference: ditto's fp32
    prompts = [
        ref.chat_prompt([{"role": "user", "content": _CAL_PROMPTS[i % len(_CAL_PROMPTS)]}]) for i in range(args.n)
    ]
    exchanges: dict[str, list | str] = {}
    T = 0.7
    for dtype in ("float32", "bfloat16"):
        short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
        if f"vllm-{short}" in skip:
            exchanges[f"vllm-{short} T=0.7"] = "--skip"
            continue
        try:
            with vllm_server(export(args.model), dtype, args.threads) as srv:
                exchanges[f"vllm-{short} T=0.7"] = collect(srv, prompts, T, T, args.tokens, True)
                if short == "fp32":
                    exchanges["vllm-fp32 T=0"] = collect(srv, prompts, 0.0, 0.0, args.tokens, True)
                    exchanges["vllm-fp32 hot (1.2 as 0.7)"] = collect(srv, prompts, 1.2, T, args.tokens, True)
                    exchanges["vllm-fp32 greedy as T=1"] = collect(srv, prompts, 0.0, 1.0, args.tokens, True)
        except (OSError, RuntimeError, TimeoutError, httpx.HTTPError) as e:
            exchanges[f"vllm-{short} T=0.7"] = f"{type(e).__name__}: {e}"
    if "llama.cpp" in skip:
        exchanges["llama.cpp Q4_1 T=0.7"] = "--skip"
    else:
        try:
            import llama_cpp.server  # noqa: F401

            with llamacpp_server(resolve_model(args.model), args.threads) as srv:
                exchanges["llama.cpp Q4_1 T=0.7"] = collect(srv, prompts, T, T, args.tokens, False)
        except ImportError as e:
            exchanges["llama.cpp Q4_1 T=0.7"] = f"llama_cpp.server does not import in this venv: {e}"
        except (OSError, RuntimeError, TimeoutError, httpx.HTTPError) as e:
            exchanges["llama.cpp Q4_1 T=0.7"] = f"{type(e).__name__}: {e}"
    rows = {}
    for name, ex in exchanges.items():
        if isinstance(ex, str):
            print(f"{name}: skipped: {ex}", flush=True)
            rows[name] = {"skipped": ex}
            continue
        judged = [(name, ref)]
        if name in OWN_CLASS:
            own = LLM(args.model, numerics=OWN_CLASS[name], progress=False)
            judged.append((f"{name} vs {OWN_CLASS[name]} ref", own))
        if OWN_CLASS.get(name) == "gguf":  # llama.cpp keeps its KV cache in fp16 (ditto's gguf default: bf16)
            own16 = LLM(args.model, numerics="gguf", kv_dtype="fp16", progress=False)
            judged.append((f"{name} vs gguf ref, fp16 KV", own16))
        for row, reference in judged:
            rows[row] = verify_config(reference, ex, ns)
            print(f"{row}: verified {rows[row]['summary']['n']} responses in {rows[row]['verify_s']:.1f} s", flush=True)
            for note in rows[row]["notes"]:
                print(f"  e.g. {note}")
    print_table(rows, ns)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
