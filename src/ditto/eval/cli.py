"""`ditto eval`: run an evaluation, resume it, re-render its report, or compare two runs.

The top-level CLI calls ``add_parser(subparsers)`` and, for ``ditto eval``, ``run(args, make_backend)``
where ``make_backend(args) -> Backend`` builds the backend from --model/--backend/--numerics/...
``python -m ditto.eval.cli`` is a standalone entry with its own backend flags (transformers or ditto).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditto.eval.prompts import FORMATS
from ditto.eval.tasks.registry import TASKS
from ditto.ray_pool import add_ray_args
from ditto.sampling_params import DEFAULTS

EPILOG = """\
examples:
  # 200 GSM8K problems, 8 samples each at T=0.7, results + report in runs/gsm8k-t07
  ditto eval --model smollm2-135m --task gsm8k --limit 200 --n 8 --temperature 0.7 --seed 0 --out runs/gsm8k-t07

  # killed half-way? run the same command again: finished problems are skipped, nothing is counted twice

  # greedy MATH-500 with the \\boxed{} instruction, few-shot
  ditto eval --model qwen2.5-0.5b --task math500 --prompt fewshot --max-tokens 1024 --out runs/math-greedy

  # synthetic arithmetic: one-digit, one-step (easy) vs two-digit, three-step problems
  ditto eval --model smollm2-135m --task arith --arith-digits 1 --arith-steps 1 --limit 100 --out runs/easy
  ditto eval --model smollm2-135m --task arith --arith-digits 1,2 --arith-steps 1-3 --out runs/mixed

  # the same problems with thousands separators (12345 -> 12,345)
  ditto eval --model smollm2-135m --task arith --arith-digits 4 --thousands-sep --out runs/commas

  # is B really better than A? (paired McNemar + bootstrap on the shared problems)
  ditto eval compare runs/plain runs/commas

  # the same run over a Ray cluster: a local one (one worker per CPU), or the cluster at an address
  ditto eval --task arith --limit 200 --determinism batch_invariant --ray --out runs/arith
  ditto eval --task arith --limit 200 --determinism batch_invariant --ray auto --ray-workers 16 --out runs/arith

  # re-render report.md / report.html of a finished run
  ditto eval report runs/gsm8k-t07

  # a reasoning strategy instead of plain sampling, at 1024 generated tokens per problem
  ditto eval --task arith-easy --strategy self_consistency --budget 1024 --max-tokens 128 \\
      --strategy-arg n=auto --strategy-arg temperature=0.7 --out runs/sc-1024
  ditto eval --task arith-easy --strategy chunk_guided --budget 1024 --second-model gemma3-270m --out runs/cgs

  # accuracy [CI] vs cost of several strategy runs, each paired against self-consistency (compare.md/.png)
  ditto eval compare runs/greedy runs/sc-1024 runs/cgs --out runs/cmp
  # ... paired instead with the self-consistency run that spent about as many tokens (give it several)
  ditto eval compare runs/greedy runs/sc-256 runs/sc-1024 runs/cgs --pair-by tokens --out runs/cmp-tok

data: gsm8k/math500 JSONL files are looked up in --data (a file or a folder), then $DITTO_DATA,
then the samples bundled with ditto (the first 200 GSM8K training problems, the first 100 of MATH-500).

defaults: --temperature and --max-tokens are SamplingParams' (greedy, 512 tokens); --seed 0 is the run
seed (each problem derives its own from it, so a run can be resumed and paired with another).
"""


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The eval-specific flags (not --model/--backend/--numerics/--determinism, which the caller adds)."""
    p.add_argument(
        "action",
        nargs="*",
        metavar="compare A B [C ...] | report DIR",
        help="omit to run an evaluation; 'compare A B' compares two run folders (more folders, or strategy "
        "runs: a cost/accuracy table and plot); 'report DIR' re-renders a run's report",
    )
    g = p.add_argument_group("task")
    g.add_argument("--task", default="gsm8k", choices=list(TASKS), help="which problems (default gsm8k)")
    g.add_argument("--data", default=None, help="JSONL file or folder for gsm8k/math500 (default: bundled sample)")
    g.add_argument("--limit", type=int, default=None, help="only the first N problems")
    g.add_argument("--offset", type=int, default=0, help="skip the first N problems")
    g.add_argument("--arith-digits", default="1", help="arith: operand digits, e.g. 1 or 1,2 or 1-3")
    g.add_argument("--arith-steps", default="1", help="arith: operations per problem, e.g. 1 or 1-4")
    g.add_argument("--arith-count", type=int, default=200, help="arith: problems per (digits, steps) level")
    g.add_argument("--arith-seed", type=int, default=0, help="arith: which problems (separate from --seed)")
    g.add_argument("--arith-ops", default="+-*", help="arith: operations to draw from (subset of '+-*')")
    g = p.add_argument_group("prompt")
    g.add_argument(
        "--prompt",
        default="chat",
        choices=FORMATS,
        help="chat (zero-shot, model's chat template), fewshot (plain Q/A exemplars), "
        "chat-fewshot, plain (zero-shot text)",
    )
    g.add_argument("--shots", type=int, default=0, help="exemplars for few-shot formats (0 = all 4)")
    g.add_argument(
        "--thousands-sep",
        dest="thousands",
        action="store_true",
        help="write numbers with thousands separators, grouped from the right",
    )
    g.add_argument("--system", default=None, help="system message for chat formats")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1, help="samples per problem (pass@k, maj@k for k <= n)")
    g.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="0 = greedy (default %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0, help="run seed; each problem gets its own derived seed")
    g.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens, help="(default %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (manifest.json, results.jsonl, report.*)")
    g.add_argument(
        "--batch-problems",
        type=int,
        default=16,
        help="problems per backend.generate call; strategy runs: problems solved at once, sharing one batch",
    )
    g.add_argument("--grader-timeout", type=float, default=10.0, help="seconds per grading call before it is killed")
    g.add_argument("--grader-workers", type=int, default=2, help="grading worker processes")
    g.add_argument(
        "--keep-tokens",
        action="store_true",
        help="record each sample's token ids and logprobs in results.jsonl (to compare runs bit for bit)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the summary (or comparison) as JSON")
    add_ray_args(p, "problems (units of --batch-problems problems, one generate call each)")
    g = p.add_argument_group("strategy (ditto.strategies; replaces plain sampling)")
    g.add_argument("--strategy", default=None, help="greedy, self_consistency, best_of_n, chunk_guided, ...")
    g.add_argument("--budget", type=int, default=None, help="max generated tokens per problem (all calls, all models)")
    g.add_argument(
        "--strategy-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="strategy knob (repeatable; JSON values): n=8, n=auto (budget // max-tokens), temperature=0.7, "
        "scorer=self|second, mode=cgs, threshold=1.0 or threshold=calibrate (glimp_router: from 20 held-out "
        "problems, large_fraction=0.25), prompt=task ... (a knob the strategy does not take is refused with its list)",
    )
    g.add_argument("--second-model", default=None, help="second model (same numerics) for two-model strategies")
    g.add_argument("--baseline", default=None, help="compare: baseline run folder (default: self_consistency run)")
    g.add_argument(
        "--pair-by",
        choices=("budget", "tokens"),
        default="budget",
        help="compare: pair each run with the self-consistency run of the closest budget (cap), or the one closest "
        "in mean generated tokens (what it spent)",
    )


def add_parser(subparsers, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """Register `eval` on a subparsers object. `parents`: parsers holding the shared backend flags."""
    p = subparsers.add_parser(
        "eval",
        parents=parents or [],
        help="evaluate a model on GSM8K / MATH-500 / synthetic arithmetic",
        description="Evaluate a model (any Backend) on a math task with sampling, robust grading and a "
        "resumable run folder; compare two runs with a paired significance test.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_args(p)
    return p


def _default_out(args) -> str:
    if getattr(args, "strategy", None):
        return f"runs/{args.task}-{args.strategy}-b{args.budget}-s{args.seed}"
    return f"runs/{args.task}-n{args.n}-t{args.temperature:g}-s{args.seed}"


def run(args, make_backend) -> int:
    """Carry out `ditto eval` for parsed `args`; `make_backend(args)` is called only when generating."""
    action = list(getattr(args, "action", []) or [])
    if action and action[0] == "compare":
        if len(action) < 3:
            print("usage: ditto eval compare RUN_A RUN_B [RUN_C ...]", file=sys.stderr)
            return 2
        from ditto.eval.report import compare, compare_strategies, is_strategy_run

        try:
            if len(action) == 3 and not any(is_strategy_run(a) for a in action[1:]):
                text, numbers = compare(action[1], action[2], seed=args.seed)
            else:
                text, numbers = compare_strategies(
                    action[1:],
                    baseline=getattr(args, "baseline", None),
                    pair_by=getattr(args, "pair_by", "budget"),
                    out=args.out,
                    seed=args.seed,
                )
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(numbers, indent=2, default=str) if args.json else text)
        return 0
    if action and action[0] == "report":
        if len(action) != 2:
            print("usage: ditto eval report RUN_DIR", file=sys.stderr)
            return 2
        from ditto.eval.report import write_report

        print(write_report(action[1]))
        return 0
    if action:
        print(f"unknown eval action {action[0]!r} (expected 'compare' or 'report')", file=sys.stderr)
        return 2
    from ditto.eval.cli_checks import check_args
    from ditto.eval.runner import EvalConfig, ResumeMismatch, run_eval

    config = EvalConfig.from_args(args)
    out = args.out or _default_out(args)
    check_args(args, config, out)  # every flag, the task's data and the strategy knobs, before any model loads
    try:
        if getattr(args, "strategy", None):
            from ditto.eval.strategy_runner import run_from_args

            summary = run_from_args(args, make_backend, config, out)
        elif getattr(args, "ray", None) is not None:
            from functools import partial

            from ditto.eval.ray_eval import run_eval_ray
            from ditto.ray_pool import UnitFailed, ray_address, worker_args

            factory = partial(make_backend, worker_args(args))
            try:
                summary = run_eval_ray(
                    factory, config, out, address=ray_address(args), workers=args.ray_workers, progress=args.progress
                )
            except UnitFailed as e:
                print(f"error: {e}; finished problems are kept: run the same command again to resume", file=sys.stderr)
                return 1
        else:
            summary = run_eval(make_backend(args), config, out, progress=args.progress)
    except ResumeMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        lo, hi = summary["accuracy_ci95"]
        print(
            f"{summary['problems']} problems x {summary['samples_per_problem']} samples: accuracy "
            f"{100 * summary['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]; "
            + ", ".join(f"pass@{k} {100 * v:.1f}%" for k, v in summary["pass_at_k"].items())
            + (
                f"; mean generated tokens {summary['cost']['mean']['generated_tokens']:.1f}"
                if "cost" in summary
                else ""
            )
            + f"\nreport: {Path(out) / 'report.md'}"
        )
    return 0


# ----------------------------------------------------------------------------------------------
# standalone entry: python -m ditto.eval.cli
# ----------------------------------------------------------------------------------------------


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder or .gguf file (transformers) or a ditto model name")
    p.add_argument("--backend", default="transformers", choices=["ditto", "transformers", "llama_cpp"])
    p.add_argument("--numerics", default="float32", help="transformers: float32 | bfloat16 | float16")
    p.add_argument("--determinism", default=None, help="ditto backend: fast | batch_invariant | exact")
    p.add_argument("--backend-batch-size", type=int, default=16, help="transformers: sequences per forward")


def default_make_backend(args):
    if args.backend == "transformers":
        from ditto.backends.transformers import TransformersBackend

        return TransformersBackend(args.model, dtype=args.numerics, batch_size=args.backend_batch_size)
    raise SystemExit(
        f"the standalone entry only builds the transformers backend; use `ditto eval` for --backend {args.backend}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ditto.eval.cli", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_backend_args(parser)
    add_eval_args(parser)
    args = parser.parse_args(argv)
    from ditto.cli_checks import UsageError

    try:
        return run(args, default_make_backend)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
