"""LLM-42's cost against plain `batch_invariant` (and `fast`), side by side in one run.

    .venv/bin/python benchmarks/llm42_cost.py [--numerics fp32] [--prompts 8] [--tokens 64] [--windows 16,64]

Same model, prompts (GSM8K chat prompts), greedy and sampled (T=0.7) decoding, EOS ignored. Prints tok/s
of each way, LLM-42's accepted fraction and rollbacks per window, and checks that LLM-42's tokens equal
`batch_invariant`'s. On a CPU `batch_invariant` runs on ditto's fixed-order C kernels and is faster than
`fast`, so LLM-42 (a `fast` draft + `batch_invariant` verification) cannot win here: the interesting
number is how much it loses, and the acceptance rate (how often `fast` and `batch_invariant` agree).
Results: benchmarks/results/llm42/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ditto import LLM, SamplingParams
from ditto.eval.tasks.registry import get_task
from ditto.llm42 import LLM42

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--numerics", default="fp32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--windows", default="16,64")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm42" / "llm42_cost.json")
    args = ap.parse_args()
    problems = get_task("gsm8k").load(limit=args.prompts)
    bi = LLM(args.model, numerics=args.numerics, determinism="batch_invariant", progress=False)
    fast = LLM(args.model, numerics=args.numerics, determinism="fast", progress=False)
    prompts = [bi.chat_prompt([{"role": "user", "content": p.question}]) for p in problems]
    report: dict = {"model": args.model, "numerics": args.numerics, "prompts": len(prompts), "tokens": args.tokens}
    for name, sp in (
        ("greedy", SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)),
        ("sampled", SamplingParams(temperature=0.7, seed=1, max_tokens=args.tokens, ignore_eos=True)),
    ):
        row: dict = {}
        for label, llm in (("batch_invariant", bi), ("fast", fast)):
            t = time.perf_counter()
            outs = llm.generate(prompts, sp)
            row[f"{label}_tok_s"] = len(prompts) * args.tokens / (time.perf_counter() - t)
            if label == "batch_invariant":
                want = [o.outputs[0].token_ids for o in outs]
            else:
                row["fast_equal_to_batch_invariant"] = sum(o.outputs[0].token_ids == w for o, w in zip(outs, want))
        for window in (int(w) for w in args.windows.split(",")):
            l42 = LLM42(args.model, numerics=args.numerics, window=window, progress=False)
            t = time.perf_counter()
            outs = l42.generate(prompts, sp)
            dt = time.perf_counter() - t
            s = l42.stats
            row[f"llm42_w{window}"] = {
                "tok_s": len(prompts) * args.tokens / dt,
                "vs_batch_invariant": len(prompts) * args.tokens / dt / row["batch_invariant_tok_s"],
                "equal_to_batch_invariant": all(o.outputs[0].token_ids == w for o, w in zip(outs, want)),
                "accepted_fraction": s["accepted"] / max(1, s["drafted"]),
                "rollbacks_per_window": s["rollbacks"] / max(1, s["windows"]),
                **s,
            }
            del l42
        report[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
