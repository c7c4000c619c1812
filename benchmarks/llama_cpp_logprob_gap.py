"""How far apart are honest engines of the same numerics class? Teacher-forced logprobs, no server.

    .venv/bin/python benchmarks/llama_cpp_logprob_gap.py [--prompts 6] [--tokens 64] [--out FILE]

For each calibration prompt (the chat template, ditto's token ids, which llama.cpp's tokenizer
reproduces), ditto fp32 samples a continuation (T=0.7); then the same ids are scored by
  llama.cpp  (llama-cpp-python in process, the bundled Q4_1 file, its logits -> log-softmax in float64)
  ditto gguf (the file's own blocks, 8-bit activation blocks; KV bf16, and again with KV fp16)
  ditto fp32 (the same blocks decoded to fp32)
and prints the mean |logprob difference| per token for each pair: the yardstick for the logprob
tolerance `ditto verify` applies to a class (benchmarks/verify_claims_peers.py uses 0.05 for gguf).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the per-prompt gaps here (JSON)")
    args = ap.parse_args()
    import llama_cpp

    from ditto import LLM, SamplingParams
    from ditto.loader.registry import resolve_model
    from ditto.verify.cli import _CAL_PROMPTS

    refs = {
        "fp32": LLM(args.model, numerics="fp32", progress=False),
        "gguf": LLM(args.model, numerics="gguf", progress=False),
        "gguf+fp16kv": LLM(args.model, numerics="gguf", kv_dtype="fp16", progress=False),
    }
    ll = llama_cpp.Llama(
        str(resolve_model(args.model)), n_ctx=2048, verbose=False, logits_all=True, n_threads=args.threads
    )

    def llama_logprobs(prompt: list[int], cont: list[int]) -> np.ndarray:
        ll.reset()
        ll.eval(prompt + cont)
        logits = np.array(ll.scores[: len(prompt) + len(cont)], dtype=np.float64)  # (T, vocab)
        top = logits.max(1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
        return np.array([logp[len(prompt) - 1 + i, t] for i, t in enumerate(cont)])

    fp32 = refs["fp32"]
    gaps: dict[str, list[float]] = {}
    for i in range(args.prompts):
        q = _CAL_PROMPTS[i % len(_CAL_PROMPTS)]
        prompt = fp32.encode(fp32.chat_prompt([{"role": "user", "content": q}]), add_special_tokens=False)
        params = SamplingParams(temperature=0.7, seed=i, max_tokens=args.tokens, ignore_eos=True)
        cont = fp32.generate([prompt], params, progress=False)[0].token_ids
        lps = {"llama.cpp": llama_logprobs(prompt, cont)}
        lps |= {name: np.array(llm.score(prompt, cont).logprobs, dtype=np.float64) for name, llm in refs.items()}
        for a, b in itertools.combinations(lps, 2):
            gaps.setdefault(f"{a} vs {b}", []).append(float(np.abs(lps[a] - lps[b]).mean()))
    print(f"mean |logprob difference| per token, {args.prompts} prompts x {args.tokens} tokens (T=0.7 draws of fp32)")
    for pair, v in gaps.items():
        print(f"{pair:28} mean {np.mean(v):.4f}  per prompt {' '.join(f'{x:.4f}' for x in v)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "gaps": gaps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
