"""Where ditto's engine step spends its time: torch.profiler ops and cProfile Python functions.

    .venv/bin/python benchmarks/profile_step.py [--batches 1,64] [--steps 8] [--numerics fp32] [--threads 1]
        [--prefill 512] [--rows 25]

For each decode batch size B: submits B GSM8K prompts (greedy, EOS ignored), steps the engine until
every sequence is decoding, then profiles ``--steps`` decode steps with torch.profiler (top aten ops
by self CPU time) and cProfile (top Python functions by cumulative and by own time), and prints the
wall time per step. ``--prefill N`` also profiles one step that prefills a single N-token prompt.
The machine may be shared: the thread count and load average are printed with every table.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ditto import LLM, SamplingParams  # noqa: E402
from ditto.bench import make_prompts  # noqa: E402


def header(what: str) -> str:
    return f"== {what} | threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}"


def _profile_steps(llm: LLM, steps: int, rows: int, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    t0 = time.perf_counter()
    for _ in range(steps):  # plain timing first (no profiler overhead)
        eng.step()
    plain = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        eng.step()
    pr.disable()
    print(header(f"{label}: {plain * 1e3:.1f} ms/step without profiler"))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(rows)
        text = s.getvalue()
        print(f"-- cProfile by {key} ({steps} steps)")
        print(text[text.find("   ncalls") :])


def profile_decode(llm: LLM, prompts: list[list[int]], batch: int, steps: int, rows: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True, seed=0)
    reqs = [llm._submit(p, params) for p in prompts[:batch]]
    eng = llm.engine
    while any(s.in_prefill for r in reqs for s in r.seqs) or any(not r.seqs[0].output_ids for r in reqs):
        eng.step()
    for _ in range(2):  # settle
        eng.step()
    n_ctx = sum(len(r.seqs[0]) for r in reqs) / len(reqs)
    _profile_steps(llm, steps, rows, f"decode batch {batch} (mean context {n_ctx:.0f} tokens)")
    for r in reqs:
        eng.abort(r.request_id)
        eng.requests.pop(r.request_id, None)


def profile_prefill(llm: LLM, prompts: list[list[int]], n: int, rows: int) -> None:
    stream = [t for p in prompts for t in p][:n]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, seed=0)
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    llm.generate([stream[: min(64, n)]], params)  # warm
    req = llm._submit(stream, params)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while not req.finished:
            eng.step()
    dt = time.perf_counter() - t0
    eng.requests.pop(req.request_id, None)
    print(header(f"prefill of one {len(stream)}-token prompt: {dt * 1e3:.0f} ms ({len(stream) / dt:.0f} tok/s)"))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--numerics", default="fp32")
    ap.add_argument("--determinism", default="fast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,64", help="decode batch sizes")
    ap.add_argument("--steps", type=int, default=8, help="decode steps profiled per batch size")
    ap.add_argument("--prefill", type=int, default=0, help="also profile the prefill of one prompt this long")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(
        args.model,
        numerics=args.numerics,
        determinism=args.determinism,
        progress=False,
        threads=args.threads,
        max_num_seqs=max(batches),
        enable_prefix_caching=False,
        kv_cache_gb=0.5,
    )
    prompts = make_prompts(llm, max(batches))
    print(f"ditto {args.numerics}/{args.determinism}, torch {torch.__version__}")
    for b in batches:
        profile_decode(llm, prompts, b, args.steps, args.rows)
    if args.prefill:
        profile_prefill(llm, prompts, args.prefill, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
