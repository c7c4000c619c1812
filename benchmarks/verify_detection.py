"""How well do Token-DiFR and Activation-DiFR tell honest generations from dishonest ones?

Usage: .venv/bin/python benchmarks/verify_detection.py [--prompts 200] [--tokens 300] [--temperature 0.7]
           [--model smollm2-135m-instruct] [--other-model gemma3-270m] [--determinism fast] [--out FILE.json]
           [--cache DIR]

Advertised configuration (what every receipt claims): --model at fp32 numerics (integer under
--determinism exact), --determinism, temperature
T, top_p 1.0, seed = 1000 + prompt index, fingerprint_k 8. Every run is verified against one fp32 reference
(ditto.verify.replay.verify_receipts: one teacher-forced pass per run).

Honest runs (negatives): fp32 generated in one big batch; in batches of 8; with 1 thread; bf16 weights and
activations (the "bf16 vs fp32 reference" case: an honest provider on other hardware/precision).
Dishonest runs (positives), each claimed as the advertised configuration:
  w4          4-bit weights (numerics="w4") served as fp32
  kv_int8     int8 KV cache (kv_dtype="int8")
  wrong_temp  sampled at T = 1.0 (or T + 0.3)
  wrong_top_p sampled with top_p = 0.9
  wrong_seed  sampled with seed + 1
  bug_1pct    an honest run with 1% of its tokens replaced by random ids (a buggy sampler)
  other_model the other bundled model's text, re-tokenized with the claimed model's tokenizer (tokenizers
              differ); Token-DiFR only (no fingerprints of the claimed model exist)
For each number of tokens n in (1, 3, 10, 30, 100, 300) up to --tokens: Token-DiFR score = mean of the
first n margins clipped at 0.5; Activation-DiFR score = mean of the first n fingerprint distances; AUC and
TPR at 1% FPR per dishonest condition, against the same-mode honest runs (the exact-reproduction claim) and
against all honest runs (bf16 counted honest: a tolerant verifier).
Prints markdown tables; writes everything (including per-run scores) as JSON to --out.

The whole benchmark is CPU-hours at 200 x 300; ``--cache DIR`` (default: next to --out) keeps each
condition's verified scores in DIR/<condition>.json as soon as it is done, so an interrupted run picks
up where it stopped (the cache is keyed by model, prompts, tokens, temperature, determinism and k).
The cost line is timed side by side at the end: ``--cost-prompts`` fresh generations in one batch, the
same receipts verified, and ``--single-stream-prompts`` generated one request at a time.
``--report-only`` prints the tables of a saved --out JSON again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from ditto import LLM, SamplingParams
from ditto.config import resolve_determinism, resolve_numerics
from ditto.verify.build import model_digest, receipt_for
from ditto.verify.claims import parse_claim
from ditto.verify.replay import verify_claims, verify_receipts
from ditto.verify.stats import auc, tpr_at_fpr
from ditto.verify.token_difr import DEFAULT_CLIP, clipped_mean

NS = (1, 3, 10, 30, 100, 300)
TOPICS = [
    "the ocean", "volcanoes", "a lighthouse keeper", "prime numbers", "photosynthesis", "the Roman empire",
    "black holes", "a lost cat", "coffee", "the moon landing", "bees", "chess", "a rainy day in Paris",
    "machine learning", "the water cycle", "dinosaurs", "a robot learning to paint", "gravity", "the desert",
    "friendship", "electricity", "a dragon", "the human heart", "autumn leaves", "trains", "the internet",
    "a haunted house", "penguins", "climate change", "music", "a time traveller", "bread baking", "mountains",
    "the printing press", "honey", "a detective", "rainbows", "the stock market", "a small village",
    "octopuses", "glaciers", "the violin", "a space station", "vaccines", "origami", "the Sahara", "lightning",
    "a pirate ship", "bicycles", "the alphabet",
]  # fmt: skip
TEMPLATES = [
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "List five interesting facts about {}.",
    "Write a poem about {}.",
]


def code_digest() -> str:
    """sha256 of the sources that decide generated tokens and verification scores: a cached condition
    is reused only while they are unchanged."""
    src = Path(__file__).resolve().parents[1] / "src" / "ditto"
    files = sorted(
        p
        for part in ("engine", "models", "numerics", "verify", "sampling.py", "llm.py")
        for p in ([src / part] if part.endswith(".py") else (src / part).rglob("*.py"))
    )
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(src).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def make_prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        out.append(TEMPLATES[(i // len(TOPICS)) % len(TEMPLATES)].format(TOPICS[i % len(TOPICS)]))
    return out


def chat_ids(llm, prompts: list[str]) -> list[list[int]]:
    if llm.tokenizer.chat_template is None:
        return [llm.encode(p) for p in prompts]
    return [llm.encode(llm.chat_prompt([{"role": "user", "content": p}]), add_special_tokens=False) for p in prompts]


def generate(llm, prompt_ids, params, batch: int, threads: int | None = None):
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        outs = []
        for lo in range(0, len(prompt_ids), batch):
            outs += llm.generate(prompt_ids[lo : lo + batch], params[lo : lo + batch])
        return outs, time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)


def claimed_numerics_for(determinism: str) -> str:
    """What every receipt claims: integer numerics under `exact`, fp32 otherwise."""
    return resolve_numerics("fp32", determinism)


def _tok_scores(runs, k):
    return [clipped_mean(r["margins"], DEFAULT_CLIP, k) for r in runs if len(r["margins"]) >= k]


def _act_scores(runs, k):
    return [float(np.mean(r["distances"][:k])) for r in runs if len(r["distances"]) >= k]


def detection_table(results: dict, ns: list[int], honest_names: list[str]) -> dict[str, dict]:
    """AUC and TPR at 1% FPR of every dishonest condition against the honest runs of `honest_names`."""
    honest_runs = [r for name in honest_names for r in results[name]["runs"]]
    table: dict[str, dict] = {}
    for name, res in results.items():
        if res["honest"]:
            continue
        row = {}
        for method, fn in (("token", _tok_scores), ("activation", _act_scores)):
            for k in ns:
                neg, pos = fn(honest_runs, k), fn(res["runs"], k)
                if neg and pos:
                    row[f"{method}@{k}"] = {"auc": auc(neg, pos), "tpr1": tpr_at_fpr(neg, pos, 0.01)}
        table[name] = row
    return table


def print_report(results: dict, cost: dict, args) -> dict:
    """Markdown tables on stdout: detection against the same-mode honest runs (the claim is exact
    reproduction) and against all honest runs (bf16 included: a tolerant verifier), honest summary, cost."""
    claimed_numerics, L = claimed_numerics_for(args.determinism), args.tokens
    ns = [x for x in NS if x <= L]

    def fmt(cell):
        return "—" if cell is None else f"{cell['auc']:.3f} / {cell['tpr1']:.2f}"

    honest_all = [name for name, res in results.items() if res["honest"]]
    honest_same = [name for name in honest_all if name.startswith(f"honest_{claimed_numerics}")]
    tables = {"same_mode": detection_table(results, ns, honest_same)}
    if honest_all != honest_same:
        tables["with_bf16"] = detection_table(results, ns, honest_all)
    head = f"{args.model}, {args.prompts} prompts x {L} tokens, T={args.temperature}, {args.determinism}"
    for key, table in tables.items():
        negs = ", ".join(honest_same if key == "same_mode" else honest_all)
        print(f"\n### Detection ({head}) vs honest runs {negs}: AUC / TPR@1%FPR\n")
        for method in ("token", "activation"):
            print(f"**{'Token-DiFR' if method == 'token' else 'Activation-DiFR'}**\n")
            print("| condition | " + " | ".join(f"n={k}" for k in ns) + " |")
            print("|---|" + "---|" * len(ns))
            for name, row in table.items():
                print(f"| {name} | " + " | ".join(fmt(row.get(f"{method}@{k}")) for k in ns) + " |")
            print()
    honest_summary = {
        name: {
            "exact_runs": res["exact_runs"],
            "runs": len(res["runs"]),
            "token_exact_frac": float(np.mean([m == 0 for r in res["runs"] for m in r["margins"]])),
            "max_token_score": max(_tok_scores(res["runs"], L) or [0.0]),
            "max_activation_score": max(_act_scores(res["runs"], L) or [0.0]),
        }
        for name, res in results.items()
        if res["honest"]
    }
    print(f"**Honest runs vs the {claimed_numerics} reference**\n")
    print("| honest condition | exact runs | exact tokens | max token score | max activation score |")
    print("|---|---|---|---|---|")
    for name, hs in honest_summary.items():
        print(
            f"| {name} | {hs['exact_runs']}/{hs['runs']} | {hs['token_exact_frac']:.4f} | "
            f"{hs['max_token_score']:.4g} | {hs['max_activation_score']:.4g} |"
        )
    print(
        f"\n**Cost** ({cost['threads']} threads): generate {cost['generate_s_per_token'] * 1e3:.2f} ms/token "
        f"(batch {cost['generate_batch']}) or {cost['generate_single_stream_s_per_token'] * 1e3:.2f} ms/token "
        f"(one request at a time), verify {cost['verify_s_per_token'] * 1e3:.2f} ms/token -> verify/generate = "
        f"{cost['verify_over_generate']:.2f} (batched), {cost['verify_over_generate_single']:.3f} (single stream)"
    )
    return {"table": tables["same_mode"], "tables": tables, "honest": honest_summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--other-model", default="gemma3-270m", help="'' to skip the other-model condition")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument(
        "--determinism",
        default="fast",
        choices=["fast", "batch_invariant", "exact"],
        help="advertised level; exact advertises numerics integer (honest runs must verify 'exact')",
    )
    ap.add_argument("--fingerprint-k", type=int, default=8, choices=[8, 16, 32])
    ap.add_argument("--batch", type=int, default=0, help="big-batch size (0: all prompts at once)")
    ap.add_argument("--skip", default="", help="comma-separated conditions to skip")
    ap.add_argument("--out", default="benchmarks/results/verify_detection.json")
    ap.add_argument("--cache", default="", help="folder of per-condition results (default: next to --out)")
    ap.add_argument("--report-only", action="store_true", help="print the tables of an earlier --out JSON")
    ap.add_argument("--cost-prompts", type=int, default=32, help="prompts generated in one batch and verified (cost)")
    ap.add_argument("--single-stream-prompts", type=int, default=4, help="prompts timed one at a time (cost)")
    args = ap.parse_args()
    if args.report_only:
        doc = json.loads(Path(args.out).read_text())
        print_report(doc["results"], doc["cost"], argparse.Namespace(**doc["args"]))
        return
    t_start = time.perf_counter()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    n, L, T = args.prompts, args.tokens, args.temperature
    big = args.batch or n

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    claimed_numerics = claimed_numerics_for(args.determinism)

    def llm_for(**kw):
        kw.setdefault("numerics", claimed_numerics)
        # a dishonest float run served under an integer claim runs batch_invariant
        det = resolve_determinism(kw["numerics"], args.determinism)
        return LLM(args.model, determinism=det, progress=False, **kw)

    ref = llm_for()
    ref_digest = model_digest(ref)
    texts = make_prompts(n)
    prompt_ids = chat_ids(ref, texts)
    claimed = [
        SamplingParams(temperature=T, seed=1000 + i, max_tokens=L, ignore_eos=True, fingerprint_k=args.fingerprint_k)
        for i in range(n)
    ]
    log(f"model {args.model}: {n} prompts x {L} tokens, T={T}, {claimed_numerics}, determinism={args.determinism}")
    results: dict[str, dict] = {}

    def verify(name: str, llm, outs, used_params, honest: bool, edit=None) -> None:
        receipts = []
        for o, used, adv in zip(outs, used_params, claimed):
            r = receipt_for(llm, o, o.outputs[0], used)
            r = dataclasses.replace(r, sampling=adv.record(), numerics=claimed_numerics, model_digest=ref_digest)
            if edit is not None:
                r = edit(r)
            receipts.append(r.seal())
        t0 = time.perf_counter()
        vs = verify_receipts(ref, receipts, threshold=math.inf)
        dt = time.perf_counter() - t0
        ntok = sum(v.n_tokens for v in vs)
        results[name] = {
            "honest": honest,
            "runs": [{"margins": list(v.margins), "distances": list(v.distances)} for v in vs],
            "exact_runs": sum(v.status == "exact" for v in vs),
            "verify_s": dt,
            "tokens": ntok,
        }
        log(f"{name}: verified {len(vs)} runs ({ntok} tokens) in {dt:.1f}s; exact runs {results[name]['exact_runs']}")

    cache = Path(args.cache) if args.cache else Path(args.out).with_suffix(".cache")
    cache.mkdir(parents=True, exist_ok=True)
    ident = [args.model, n, L, T, args.determinism, args.fingerprint_k, big, ref_digest]
    cache_key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]

    code = code_digest()

    def condition(name: str, run) -> None:
        """results[name] from the cache (when the code that makes the numbers is unchanged), or run(),
        which fills results[name], then saved."""
        path = cache / f"{cache_key}-{name}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("code_digest", code) == code:  # (entries from before digests were kept: accepted)
                results[name] = cached
                log(f"{name}: from cache {path}")
                return
            log(f"{name}: cached with other engine/numerics code; recomputing")
        run()
        results[name]["code_digest"] = code
        path.write_text(json.dumps(results[name]))

    honest_big: dict = {}

    def honest_outputs():
        if "outs" not in honest_big:
            outs, gen_s = generate(ref, prompt_ids, claimed, big)
            honest_big.update(outs=outs, gen_s=gen_s, tokens=sum(len(o.outputs[0].token_ids) for o in outs))
            log(f"honest_{claimed_numerics}_b{big}: generated {honest_big['tokens']} tokens in {gen_s:.1f}s")
        return honest_big["outs"]

    def run_honest_big():
        verify(f"honest_{claimed_numerics}_b{big}", ref, honest_outputs(), claimed, True)
        results[f"honest_{claimed_numerics}_b{big}"]["generate_s"] = honest_big["gen_s"]

    def run_with(name: str, llm_kw: dict, params, honest: bool, batch=big, threads=None, key: str = ""):
        def run():
            llm = llm_for(**llm_kw) if llm_kw else ref
            outs, _ = generate(llm, prompt_ids, params, batch, threads=threads)
            verify(name, llm, outs, params, honest)

        if (key or name) not in skip:
            condition(name, run)

    # -- honest ------------------------------------------------------------------------------
    condition(f"honest_{claimed_numerics}_b{big}", run_honest_big)
    if big != 8:
        run_with(f"honest_{claimed_numerics}_b8", {}, claimed, True, batch=8, key="honest_b8")
    run_with(f"honest_{claimed_numerics}_b{big}_t1", {}, claimed, True, threads=1, key="honest_t1")
    if claimed_numerics == "fp32":
        run_with("honest_bf16", {"numerics": "bf16"}, claimed, True)

    # -- dishonest -----------------------------------------------------------------------------
    run_with(f"w4_as_{claimed_numerics}", {"numerics": "w4"}, claimed, False, key="w4")
    if claimed_numerics == "fp32":  # the integer mode's KV cache is int8 already
        run_with("kv_int8", {"kv_dtype": "int8"}, claimed, False)
    run_with("wrong_temp", {}, [p.replace(temperature=1.0 if T != 1.0 else T + 0.3) for p in claimed], False)
    run_with("wrong_top_p", {}, [p.replace(top_p=0.9) for p in claimed], False)
    run_with("wrong_seed", {}, [p.replace(seed=p.seed + 1) for p in claimed], False)
    if "bug_1pct" not in skip:
        rng = random.Random(0)
        vocab = ref.loaded.config.vocab_size

        def corrupt(r):
            ids = list(r.output_token_ids)
            for t in range(len(ids)):
                if rng.random() < 0.01:
                    ids[t] = rng.randrange(vocab)
            return dataclasses.replace(r, output_token_ids=tuple(ids))

        condition("bug_1pct", lambda: verify("bug_1pct", ref, honest_outputs(), claimed, False, edit=corrupt))
    if args.other_model and "other_model" not in skip:

        def run_other():
            # a dishonest provider's own numerics do not matter to the check: bf16, fast (the cheapest)
            other = LLM(args.other_model, numerics="bf16", determinism="fast", progress=False)
            oo, _ = generate(other, chat_ids(other, texts), claimed, big)
            claims = []
            for i, o in enumerate(oo):
                rec = {"id": f"p{i}", "prompt_token_ids": prompt_ids[i], "output_text": o.outputs[0].text}
                rec.update(temperature=T, seed=claimed[i].seed, max_tokens=L)
                claims += parse_claim(rec, i + 1)
            del other
            t0 = time.perf_counter()
            vs = verify_claims(ref, claims, threshold=math.inf)
            results["other_model"] = {
                "honest": False,
                "runs": [{"margins": list(v.margins)[:L], "distances": []} for v in vs],
                "exact_runs": sum(v.status == "exact" for v in vs),
                "verify_s": time.perf_counter() - t0,
                "tokens": sum(v.n_tokens for v in vs),
            }
            log(f"other_model: verified {len(vs)} re-tokenized claims")

        condition("other_model", run_other)

    # -- cost: verify vs generate, timed side by side now on the same prompts (the conditions above may
    # have run on a loaded machine): one batch of --cost-prompts, the same receipts verified, and
    # --single-stream-prompts generated one request at a time --------------------------------------
    kc = min(args.cost_prompts, n)
    c_outs, c_gen_s = generate(ref, prompt_ids[:kc], claimed[:kc], kc)
    c_receipts = [receipt_for(ref, o, o.outputs[0], p).seal() for o, p in zip(c_outs, claimed[:kc])]
    t0 = time.perf_counter()
    c_vs = verify_receipts(ref, c_receipts, threshold=math.inf)
    c_ver_s = time.perf_counter() - t0
    c_tokens = sum(v.n_tokens for v in c_vs)
    k1 = min(args.single_stream_prompts, n)
    _, single_s = generate(ref, prompt_ids[:k1], claimed[:k1], 1)
    cost = {
        "generate_s_per_token": c_gen_s / c_tokens,
        "generate_single_stream_s_per_token": single_s / (k1 * L),
        "verify_s_per_token": c_ver_s / c_tokens,
        "generate_batch": kc,
        "threads": torch.get_num_threads(),
        "exact_runs": sum(v.status == "exact" for v in c_vs),
    }
    cost["verify_over_generate"] = cost["verify_s_per_token"] / cost["generate_s_per_token"]
    cost["verify_over_generate_single"] = cost["verify_s_per_token"] / cost["generate_single_stream_s_per_token"]
    log(f"cost: {cost}")

    report = print_report(results, cost, args)
    doc = {
        "args": vars(args),
        **report,
        "cost": cost,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, default=str, allow_nan=True) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
