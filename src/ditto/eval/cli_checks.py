"""`ditto eval`: every flag, the task's data and the strategy's knobs are checked before a model loads."""

from __future__ import annotations

from pathlib import Path

from ditto import cli_checks as check


def check_args(args, config, out: str) -> None:
    """UsageError naming the flag (or the data file and line) for the first bad input of an eval run.

    `config` is the EvalConfig built from `args`; `out` the run folder."""
    check.positive(args, "n", "batch_problems", "grader_workers", "arith_count", "budget")
    check.non_negative(args, "limit", "offset", "shots")
    check.positive_number(args, "grader_timeout")
    check.sampling_params(
        args,
        n=config.n,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        seed=config.seed,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
    )
    check.backend_flags(args)
    if getattr(args, "backend", "ditto") == "ditto" and hasattr(args, "max_num_seqs"):
        check.engine(args)
    elif getattr(args, "model", None) and getattr(args, "backend", None) != "transformers":
        check.model(args.model)
    if getattr(args, "second_model", None):
        if getattr(args, "backend", None) == "openai":
            raise check.UsageError(
                "argument --second-model: not with --backend openai (one --base-url serves one model; "
                "the second model would be asked of the same server)"
            )
        check.model(args.second_model)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise check.UsageError(f"argument --out: {out} exists and is not a folder")
    if config.task.startswith("arith"):
        _arith(config)
    try:
        problems = config.make_task().load(limit=config.limit, offset=config.offset)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise check.UsageError(f"argument --data: {exc}") from None
    if not problems:
        raise check.UsageError(f"argument --offset: no problems left after skipping {config.offset}")
    if getattr(args, "strategy", None):
        _strategy(args, config)
    if hasattr(args, "ray"):
        from ditto.ray_pool import check_ray_args

        check_ray_args(args)
        if args.ray is not None and getattr(args, "strategy", None):
            raise check.UsageError("argument --ray: not with --strategy (plain sampling runs only)")


def _arith(config) -> None:
    from ditto.eval.tasks.arith import _as_list

    for name in ("arith_digits", "arith_steps"):
        value = getattr(config, name)
        try:
            levels = _as_list(value)
        except ValueError:
            levels = []
        check.check(bool(levels) and min(levels) >= 1, name, "N, N,M or N-M with N >= 1", value)
    ops = config.arith_ops
    check.check(bool(ops) and not set(ops) - set("+-*"), "arith_ops", "a non-empty subset of '+-*'", ops)


def _strategy(args, config) -> None:
    from ditto.eval.strategy_runner import StrategySpec, build_strategy, parse_strategy_args

    try:
        spec = StrategySpec(
            name=args.strategy,
            budget=args.budget,
            args=parse_strategy_args(args.strategy_arg),
            second_model=args.second_model,
        )
    except ValueError as exc:
        raise check.UsageError(f"argument --strategy-arg: {exc}") from None
    second = object() if args.second_model else None  # stands in for the second model: nothing is loaded
    try:
        build_strategy(spec, config.max_tokens, seed=config.seed, second=second, renderer=lambda *a: "")
    except KeyError as exc:
        raise check.UsageError(f"argument --strategy: {exc.args[0] if exc.args else exc}") from None
    except (ValueError, TypeError) as exc:
        raise check.UsageError(f"argument --strategy-arg: {exc}") from None
