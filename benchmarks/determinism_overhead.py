"""What does a determinism level cost? Same batched workload, levels side by side in one run.

    python benchmarks/determinism_overhead.py --prompts 32 --new-tokens 64 --threads 2

Each configuration generates the same GSM8K prompts (greedy, fixed length); rounds alternate
between configurations so machine noise hits them alike. Prints output tok/s and the ratio of
each level to `fast` at the same numerics (goal: batch_invariant costs < 10%; exact >= fp32 fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

NUMERICS = ["fp32", "bf16", "fp16", "layercast", "int8", "w8a8", "w4", "w4-asym", "mxint8", "gguf"]
CONFIGS = {f"{num}-{det}": (num, det) for num in NUMERICS for det in ("fast", "batch_invariant")}
CONFIGS["integer-exact"] = ("integer", "exact")


def gsm8k_questions(n: int) -> list[str]:
    root = Path(os.environ.get("DITTO_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    lines = (root / "gsm8k-train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["question"] for line in lines]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ditto import LLM, SamplingParams

    names = args.configs.split(",")
    prompts, best = None, {n: 0.0 for n in names}
    refused: dict[str, str] = {}
    # one numerics mode at a time (its levels loaded together, rounds alternating between them), so
    # memory holds two engines, not twenty
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(CONFIGS[n][0], []).append(n)
    for group in groups.values():
        llms = {}
        for n in group:
            try:
                llms[n] = LLM(
                    args.model,
                    numerics=CONFIGS[n][0],
                    determinism=CONFIGS[n][1],
                    progress=False,
                    max_num_seqs=32,
                    enable_prefix_caching=False,
                )
            except ValueError as err:  # a level the mode refuses (LLM.int8 cannot be batch invariant)
                refused[n] = str(err).split(";")[0]
                print(f"{n}: refused: {refused[n]}", flush=True)
        if not llms:
            continue
        if prompts is None:
            first = next(iter(llms.values()))
            questions = gsm8k_questions(args.prompts)
            prompts = [
                first.encode(first.chat_prompt([{"role": "user", "content": q}]), add_special_tokens=False)
                for q in questions
            ]
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        for _ in range(args.rounds):
            for n, llm in llms.items():
                t0 = time.perf_counter()
                llm.generate(prompts, params, progress=False)
                best[n] = max(best[n], args.prompts * args.new_tokens / (time.perf_counter() - t0))
        print(" ".join(f"{n} {best[n]:.1f}" for n in llms), f"load {os.getloadavg()[0]:.2f}", flush=True)
        del llms
    print(
        f"threads={torch.get_num_threads()} load={os.getloadavg()[0]:.1f} "
        f"workload={args.prompts} prompts x {args.new_tokens} tokens, best of {args.rounds}"
    )
    print("| config | output tok/s | vs fast (same numerics) | vs fp32-fast |")
    print("|---|---|---|---|")
    for n in names:
        base = f"{CONFIGS[n][0]}-fast"
        vs = f"{best[n] / best[base]:.2f}x" if best.get(base) and base != n else ""
        ref = f"{best[n] / best['fp32-fast']:.2f}x" if best.get("fp32-fast") else ""
        if n in refused:
            print(f"| {n} | refused: {refused[n]} | | |")
            continue
        print(f"| {n} | {best[n]:.1f} | {vs} | {ref} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
