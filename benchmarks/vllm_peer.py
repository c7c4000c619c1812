"""vLLM (CPU build) as a benchmark peer: runs inside its own venv (`make peers` makes .venv-vllm).

One-shot:

    .venv-vllm/bin/python benchmarks/vllm_peer.py --model DIR --dtype float32|bfloat16 --threads 2 \
        --prompts prompts.json --new-tokens 128 --mode single|batched --out result.json

Worker (what benchmarks/engine_vs_peers.py uses, so the model loads once for every round):

    .venv-vllm/bin/python benchmarks/vllm_peer.py --model DIR --dtype float32 --threads 2 --serve --result-fd N

reads one JSON request a line on stdin ({"mode": "single"|"batched", "prompts": [[ids...], ...],
"new_tokens": 128}; {"mode": "quit"} ends it) and writes one JSON result a line to file descriptor N.

`--model` is an HF folder (config.json + safetensors + tokenizer; benchmarks/export_hf.py makes one
from a GGUF). Prompts are TOKEN IDS (a JSON list of lists), so every engine gets the same ids;
decoding is greedy with EOS ignored, exactly `--new-tokens` tokens per prompt. Results: wall time,
output tok/s, for single also the time to first token and the decode tok/s after it (from vLLM's
per-request engine timestamps), and the generated token ids.

Threads: vLLM's CPU worker binds its OpenMP threads to the cores in VLLM_CPU_OMP_THREADS_BIND; with
`--threads N` that is cores 0..N-1 unless the variable is already set. Nothing is downloaded
(HF_HUB_OFFLINE=1). vLLM spawns processes, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _setup_env(threads: int, kv_gb: float) -> None:
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_gb))),
        # engine core in this process: on a 2-core machine a separate engine-core process only
        # competes with the model's threads (single stream ~32 tok/s here against ~26 with it)
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }.items():
        os.environ.setdefault(k, v)


def make_llm(model: str, dtype: str, max_num_seqs: int, max_model_len: int, eager: bool):
    from vllm import LLM

    return LLM(
        model=model,
        dtype=dtype,
        seed=0,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_prefix_caching=False,  # repeated rounds must not reuse the prompt's KV
        disable_log_stats=False,  # per-request timestamps (RequestOutput.metrics) for TTFT / decode rate
        enforce_eager=eager,
        skip_tokenizer_init=True,  # prompts arrive as ids, outputs leave as ids
    )


def _params(new_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, detokenize=False, seed=0
    )


def _generate(llm, prompts: list[list[int]], new_tokens: int):
    from vllm.inputs import TokensPrompt

    reqs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    return llm.generate(reqs, _params(new_tokens), use_tqdm=False)


def run(llm, mode: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """One workload: 'single' (the first prompt alone) or 'batched' (all prompts submitted at once)."""
    if mode == "single":
        prompts = prompts[:1]
    elif mode != "batched":
        raise ValueError(f"unknown mode {mode!r}")
    t0 = time.perf_counter()
    outs = _generate(llm, prompts, new_tokens)
    dt = time.perf_counter() - t0
    ids = [list(o.outputs[0].token_ids) for o in outs]
    n = sum(map(len, ids))
    res = {"mode": mode, "tokens": n, "s": dt, "tok_s": n / dt, "token_ids": ids}
    if mode == "single":
        m = getattr(outs[0], "metrics", None)
        first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
        if m is not None and last > first > 0 and n > 1:
            res["ttft_s"] = m.first_token_latency
            res["decode_tok_s"] = (n - 1) / (last - first)
            res["timing"] = "vllm request stats"
        else:  # no stats: time a one-token request as the time to first token
            t1 = time.perf_counter()
            _generate(llm, prompts, 1)
            ttft = time.perf_counter() - t1
            res["ttft_s"] = ttft
            res["decode_tok_s"] = (n - 1) / max(1e-9, dt - ttft)
            res["timing"] = "wall clock, one-token request as TTFT"
    return res


ENV_KEYS = (
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
)


def describe(args, load_s: float) -> dict:
    import torch
    import vllm

    return {
        "engine": f"vllm-cpu {vllm.__version__}",
        "torch": torch.__version__,
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "compiled": not args.eager,
        "load_s": load_s,
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
    }


def serve(llm, result_fd: int, info: dict) -> int:
    out = os.fdopen(result_fd, "w", buffering=1)
    out.write(json.dumps({"ready": True, **info}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("mode") == "quit":
            break
        try:
            res = run(llm, req["mode"], req["prompts"], int(req["new_tokens"]))
        except Exception as exc:  # report it to the caller, keep serving
            res = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(res) + "\n")
    out.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF folder (benchmarks/export_hf.py)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", help="JSON file: a list of token-id lists")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mode", default="batched", help="single, batched or both (comma-separated)")
    ap.add_argument("--reps", type=int, default=1, help="rounds of each mode (best kept); one warm-up first")
    ap.add_argument("--out", help="write the results as JSON here (default: stdout)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--eager", action="store_true", help="no torch.compile (faster start, slower run)")
    ap.add_argument("--serve", action="store_true", help="answer JSON requests from stdin (see above)")
    ap.add_argument("--result-fd", type=int, default=None, help="--serve: file descriptor for the results")
    args = ap.parse_args()
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    if not args.serve and not args.prompts:
        ap.error("--prompts is required unless --serve")
    _setup_env(args.threads, args.kv_cache_gb)

    t0 = time.perf_counter()
    llm = make_llm(args.model, args.dtype, args.max_num_seqs, args.max_model_len, args.eager)
    load_s = time.perf_counter() - t0
    print(f"[vllm_peer] loaded {args.model} ({args.dtype}) in {load_s:.1f}s", file=sys.stderr)
    if args.serve:
        fd = args.result_fd if args.result_fd is not None else sys.stdout.fileno()
        return serve(llm, fd, describe(args, load_s))

    with open(args.prompts) as f:
        prompts = json.load(f)
    result = {**describe(args, load_s), "new_tokens": args.new_tokens, "prompts": len(prompts)}
    run(llm, "single", prompts, 4)  # warm-up
    for mode in [m.strip() for m in args.mode.split(",") if m.strip()]:
        key = "decode_tok_s" if mode == "single" else "tok_s"
        best = None
        for _ in range(args.reps):
            r = run(llm, mode, prompts, args.new_tokens)
            print(f"[vllm_peer] {mode}: {r[key]:.1f} tok/s", file=sys.stderr)
            if best is None or r[key] > best[key]:
                best = r
        result[mode] = best
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
