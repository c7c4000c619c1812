"""`ditto bench`: throughput and latency of the engine on GSM8K prompts.

    ditto bench --prompts 64 --output-len 256              all prompts submitted at once (batched)
    ditto bench --prompts 8 --single-stream                one request at a time
    ditto bench --input-len 512 --output-len 128 --json b.json

Prompts are GSM8K training questions in the model's chat template (``--raw`` for the bare
question); ``--input-len N`` instead cuts every prompt to exactly N tokens of the concatenated
GSM8K text. Generation is greedy with EOS ignored, so every request produces exactly
``--output-len`` tokens per sample. Reported: output and total (prompt + output) tokens per
second, time to first token and per-output-token latency (p50 / p99 over requests, from
``RequestOutput.metrics``), end-to-end latency, prefill vs decode tokens, engine steps and
preemptions. The thread count and load average are recorded: the machine may be shared.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ditto.sampling_params import DEFAULTS


def gsm8k_questions(count: int, data: str | None = None, offset: int = 0) -> list[str]:
    from ditto.eval.tasks.base import find_data_file, read_jsonl

    rows = read_jsonl(find_data_file(["gsm8k-train.jsonl", "gsm8k.jsonl"], data), ("question",), "GSM8K")
    out = [rows[(offset + i) % len(rows)]["question"] for i in range(count)]
    return out


def make_prompts(
    backend,
    count: int,
    input_len: int | None = None,
    chat: bool = True,
    data: str | None = None,
) -> list[list[int]]:
    """Token-id prompts for `backend` (anything with encode / chat_prompt / tokenizer.chat_template)."""
    questions = gsm8k_questions(count if input_len is None else max(count, 64) * 4, data)
    if input_len is not None:
        stream: list[int] = []
        for q in questions:
            stream.extend(backend.encode(q + "\n", add_special_tokens=False))
            if len(stream) >= count * input_len:
                break
        while len(stream) < count * input_len:
            stream = stream + stream
        return [stream[i * input_len : (i + 1) * input_len] for i in range(count)]
    has_template = getattr(getattr(backend, "tokenizer", None), "chat_template", None) is not None
    if chat and has_template:
        texts = [backend.chat_prompt([{"role": "user", "content": q}]) for q in questions]
        return [backend.encode(t, add_special_tokens=False) for t in texts]
    return [backend.encode(q) for q in questions]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def run_bench(
    llm,
    prompts: list[list[int]],
    output_len: int = 256,
    n: int = 1,
    temperature: float = 0.0,
    single_stream: bool = False,
    warmup: bool = True,
    seed: int = 0,
) -> dict:
    """Generate `output_len` tokens (EOS ignored) for every prompt; return throughput and latency numbers."""
    from ditto.sampling import SamplingParams

    params = SamplingParams(
        n=n, temperature=temperature, max_tokens=output_len, ignore_eos=True, seed=seed, skip_special_tokens=True
    )
    if warmup:
        llm.generate([prompts[0]], params.replace(n=1, max_tokens=min(4, output_len)))
    stats0 = dict(llm.engine.stats)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    outs = [llm.generate([p], params)[0] for p in prompts] if single_stream else llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    stats = {k: llm.engine.stats[k] - stats0.get(k, 0) for k in llm.engine.stats}
    out_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    in_tokens = sum(len(p) for p in prompts)
    ttft = [o.metrics["ttft_s"] for o in outs]
    latency = [o.metrics["latency_s"] for o in outs]
    tpot = []
    for o in outs:
        n_out = max(len(c.token_ids) for c in o.outputs)
        if n_out > 1:
            tpot.append((o.metrics["latency_s"] - o.metrics["ttft_s"]) / (n_out - 1))
    return {
        "engine": "ditto",
        "numerics": llm.config.numerics,
        "determinism": llm.config.determinism,
        "mode": "single-stream" if single_stream else "batched",
        "prompts": len(prompts),
        "n": n,
        "input_tokens": in_tokens,
        "mean_input_len": in_tokens / len(prompts),
        "output_len": output_len,
        "output_tokens": out_tokens,
        "elapsed_s": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + in_tokens) / elapsed,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "prefill_tokens": stats.get("prefill_tokens", 0),
        "decode_tokens": stats.get("decode_tokens", 0),
        "steps": stats.get("steps", 0),
        "preemptions": stats.get("preemptions", 0),
        "max_num_seqs": llm.config.max_num_seqs,
        "max_num_batched_tokens": llm.config.max_num_batched_tokens,
        "threads": torch.get_num_threads(),
        "loadavg_start": list(load0),
        "loadavg_end": list(os.getloadavg()),
    }


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v * 1e3:.1f}"


def rich_table(result: dict):
    from rich.table import Table

    r = result
    table = Table(
        title=f"ditto bench: {r.get('model', '')} numerics={r['numerics']} determinism={r['determinism']} "
        f"{r['mode']}, threads {r['threads']}, load {r['loadavg_start'][0]:.2f}->{r['loadavg_end'][0]:.2f}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests x samples", f"{r['prompts']} x {r['n']}"),
        ("mean input tokens", f"{r['mean_input_len']:.1f}"),
        ("output tokens / request", str(r["output_len"])),
        ("elapsed s", f"{r['elapsed_s']:.2f}"),
        ("output tok/s", f"{r['output_tok_s']:.1f}"),
        ("total tok/s", f"{r['total_tok_s']:.1f}"),
        ("TTFT p50 / p99 ms", f"{_ms(r['ttft_p50_s'])} / {_ms(r['ttft_p99_s'])}"),
        ("per-token latency p50 / p99 ms", f"{_ms(r['tpot_p50_s'])} / {_ms(r['tpot_p99_s'])}"),
        ("request latency p50 / p99 s", f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f}"),
        ("prefill / decode tokens", f"{r['prefill_tokens']} / {r['decode_tokens']}"),
        ("engine steps", str(r["steps"])),
        ("preemptions", str(r["preemptions"])),
        ("max_num_seqs / batched tokens", f"{r['max_num_seqs']} / {r['max_num_batched_tokens']}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


def add_parser(subparsers, parents=()):
    p = subparsers.add_parser(
        "bench",
        parents=list(parents),
        help="throughput / latency table on GSM8K prompts",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--prompts", type=int, default=64, help="number of requests (default 64)")
    p.add_argument("--input-len", type=int, default=None, help="cut prompts to this many tokens (default: GSM8K)")
    p.add_argument("--output-len", type=int, default=256, help="tokens generated per sample (EOS ignored)")
    p.add_argument("--n", type=int, default=1, help="samples per request (default 1)")
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--single-stream", action="store_true", help="one request at a time")
    p.add_argument("--raw", action="store_true", help="bare questions, no chat template")
    p.add_argument(
        "--data", default=None, help="GSM8K JSONL file or folder (default: $DITTO_DATA, else the bundled 200 problems)"
    )
    p.add_argument(
        "--json", default=None, metavar="FILE", help="write the result as JSON to FILE ('-': stdout, table on stderr)"
    )
    p.set_defaults(func=cmd_bench)
    return p


def _fill_engine_defaults(args) -> None:
    """Restore engine defaults another subcommand's set_defaults(None) may have reset on the shared parent
    parser (argparse shares the parent's actions among subparsers)."""
    from ditto.config import EngineConfig

    d = EngineConfig()
    args.model = args.model or "smollm2-135m-instruct"
    args.numerics = args.numerics or d.numerics
    args.determinism = args.determinism or d.determinism


def check_args(args) -> None:
    """Every flag and the data file, before the model loads (UsageError naming the flag)."""
    from ditto import cli_checks as check

    check.positive(args, "prompts", "input_len", "output_len", "n")
    check.sampling_params(args, n=args.n, max_tokens=args.output_len, seed=0)  # --temperature
    check.engine(args)
    check.output_file(args.json, "json", stdout_ok=True)
    try:
        gsm8k_questions(1, args.data)
    except (FileNotFoundError, ValueError) as exc:
        raise check.UsageError(f"argument --data: {exc}") from None


def cmd_bench(args) -> int:
    from rich.console import Console

    from ditto.cli import make_llm

    _fill_engine_defaults(args)
    check_args(args)
    llm = make_llm(args, progress=False)
    prompts = make_prompts(llm, args.prompts, args.input_len, chat=not args.raw, data=args.data)
    result = run_bench(
        llm,
        prompts,
        output_len=args.output_len,
        n=args.n,
        temperature=args.temperature,
        single_stream=args.single_stream,
    )
    result["model"] = args.model
    Console(file=sys.stderr if args.json == "-" else None).print(rich_table(result))
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
