"""Throughput of `exact` (integer numerics) vs fp32 `fast` on SmolLM2, and top-1 agreement with fp32.

    .venv/bin/python benchmarks/exact_vs_fp32.py [--prompts 32] [--tokens 64] [--threads N]

Both engines are loaded in one process and the timed runs alternate (fp32, integer, fp32, integer
with --repeat 2), so a noisy shared machine slows both alike; the ratio is what to read. Top-1
agreement: teacher-forced next-token argmax of the integer model vs fp32 on a held-out text
(not the calibration text).
"""

from __future__ import annotations

import argparse
import time

import torch

from ditto import LLM, SamplingParams

HELD_OUT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, trimmed "
    "the wick and polished the great lens until it gleamed. Ships far out at sea watched for the beam that "
    "swept the water every twelve seconds, and by counting the pause between flashes the captains knew which "
    "coast they were passing. In winter the storms came in from the west, and waves broke over the rocks so "
    "high that salt spray rattled against the lantern room windows. The keeper kept a log of every vessel he "
    "saw: its name if he could read it, the direction it sailed and the state of the weather. Over forty "
    "years the log filled eleven thick volumes. When the light was finally automated, the volumes were given "
    "to the town library, where children still read them on rainy afternoons, tracing the routes of ships "
    "that sank long ago. To compute the area of a circle, multiply pi by the square of the radius: a circle "
    "of radius 3 has an area of about 28.27. A kilometre is a thousand metres, and a marathon is a little "
    "over 42 kilometres long."
)


def prompts(n: int) -> list[str]:
    topics = ["the ocean", "a small village", "prime numbers", "how bread is made", "the moon", "trains",
              "a chess game", "autumn leaves"]  # fmt: skip
    return [f"Write a short story about {topics[i % len(topics)]} (number {i})." for i in range(n)]


def run(llm: LLM, ps: list[str], tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t = time.perf_counter()
    out = llm.generate(ps, params, chat=True)
    dt = time.perf_counter() - t
    return dt, sum(len(o.outputs[0].token_ids) for o in out)


def top1_agreement(ref: LLM, test: LLM, text: str) -> float:
    ids = ref.encode(text)
    a = ref.score(ids[:1], ids[1:], keep_logits=True).logits.argmax(-1)
    b = test.score(ids[:1], ids[1:], keep_logits=True).logits.argmax(-1)
    return float((a == b).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = dict(progress=False, max_num_seqs=args.prompts, num_kv_blocks=1024)
    t = time.perf_counter()
    fp = LLM(args.model, numerics="fp32", determinism="fast", **opts)
    t_fp = time.perf_counter() - t
    t = time.perf_counter()
    ex = LLM(args.model, numerics="integer", determinism="exact", **opts)
    t_ex = time.perf_counter() - t
    print(f"setup: fp32 {t_fp:.1f} s, integer {t_ex:.1f} s (threads={torch.get_num_threads()})", flush=True)
    ps = prompts(args.prompts)
    run(fp, ps[:2], 2)  # warm-up
    run(ex, ps[:2], 2)
    rates: dict[str, list[float]] = {"fp32": [], "exact": []}
    for _ in range(args.repeat):
        for name, llm in (("fp32", fp), ("exact", ex)):
            dt, n = run(llm, ps, args.tokens)
            rates[name].append(n / dt)
            print(f"{name:6s} {n} tokens in {dt:.1f} s = {n / dt:.1f} tok/s", flush=True)
    best = {k: max(v) for k, v in rates.items()}
    print(f"throughput ratio exact / fp32 = {best['exact'] / best['fp32']:.2f} "
          f"({args.prompts} prompts x {args.tokens} new tokens)")  # fmt: skip
    print(f"top-1 agreement with fp32 on a held-out text: {top1_agreement(fp, ex, HELD_OUT):.1%}")


if __name__ == "__main__":
    main()
