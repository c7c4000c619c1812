"""`ditto repro`: run one workload over a matrix of inference configurations and report how outputs move."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

from ditto.ray_pool import add_ray_args
from ditto.sampling_params import DEFAULTS

EPILOG = """examples:
  ditto repro --task gsm8k --limit 50 --numerics fp32,bf16,layercast --determinism fast,batch_invariant \\
      --batch-sizes 1,8,32 --threads 2 --backends ditto,transformers,llama_cpp --out runs/repro
  ditto repro --configs ditto:fp32:batch_invariant:1,ditto:fp32:batch_invariant:8,transformers:fp32:-:8 \\
      --task arith-easy --limit 20 --out runs/repro-small
  ditto repro --report-only --out runs/repro            re-render the report of a finished study
  ditto repro --numerics fp32,bf16 --batch-sizes 1,8,32 --threads 1,2 --ray --out runs/repro   configs over Ray
  ditto repro --backends ditto,openai --numerics fp32,bf16 --batch-sizes 1,32 \
      --server vllm-fp32=http://127.0.0.1:8001/v1 --server vllm-bf16=http://127.0.0.1:8002/v1 \
      --out runs/repro-vllm                             ditto beside two vLLM servers

Config spec (--configs): backend:numerics:determinism:batch[:threads], '-' for the backend default;
openai:-:-:8 is the server at --base-url with 8 requests in flight (its numerics and determinism are the server's);
with --server LABEL=URL (repeatable) an openai config's numerics slot names the server: openai:vllm-bf16:-:32.
The matrix flags (--backends, --numerics, --determinism, --batch-sizes, --threads) take comma lists;
invalid combinations (integer numerics without determinism exact, transformers integer, llama_cpp
batch > 1) are skipped and listed with a reason. A study folder is resumable per config.
"""


SERVER = "server"  # runner.SERVER: the --base-url server's label (not imported: `ditto --help` stays light)


def _csv(s: str | int | None) -> list[str]:
    if s is None:
        return []
    return [x.strip() for x in str(s).split(",") if x.strip()]


def add_parser(subparsers, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "repro",
        parents=parents or [],
        help="reproducibility study: one workload over a matrix of configurations",
        description="Run one workload (a task subset, greedy or seeded sampling) under every configuration of "
        "a matrix (numerics x determinism x batch size x threads x backend) and report distinct outputs, "
        "divergence indices, agreement and accuracy spread.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _comma_lists(p, ("numerics", "determinism", "threads"))
    p.set_defaults(numerics="fp32", determinism="fast,batch_invariant", threads=None)
    p.add_argument(
        "--backends",
        default="ditto",
        help="comma list of ditto, transformers, llama_cpp, openai (a server at --base-url; its batch sizes are "
        "requests in flight)",
    )
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="LABEL=URL",
        help="a named OpenAI-compatible server (repeatable), e.g. vllm-bf16=http://127.0.0.1:8002/v1; "
        "--backends openai then runs one config per server, and --configs names it as openai:LABEL:-:BATCH",
    )
    p.add_argument("--batch-sizes", default="1,8", help="comma list (ditto: max_num_seqs; transformers: batch)")
    p.add_argument("--configs", default=None, help="explicit configs, comma separated (added to the matrix)")
    p.add_argument("--no-matrix", action="store_true", help="run only --configs, not the matrix flags")
    p.add_argument("--task", default="gsm8k", help="gsm8k | math500 | arith | arith-easy")
    p.add_argument(
        "--data", default=None, help="task data file or folder (default: $DITTO_DATA, else the bundled sample)"
    )
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--prompt", default="chat", help="chat | fewshot | chat-fewshot | plain")
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens, help="(default %(default)s)")
    p.add_argument("--reference", default=None, help="config name used as the reference (default: the first)")
    p.add_argument("--out", default="runs/repro")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_ray_args(
        p,
        "configurations (one unit each)",
        worker="builds each of its configurations' engine in turn, on the thread count the configuration names "
        "(and reserves the largest of them on the cluster)",
    )
    p.set_defaults(func=run)
    return p


def _comma_lists(p: argparse.ArgumentParser, dests: tuple[str, ...]) -> None:
    """Let the shared engine flags take comma lists here. argparse shares parent actions between
    subcommands, so each one is replaced by a modified copy rather than changed in place."""
    for i, action in enumerate(p._actions):
        if action.dest not in dests:
            continue
        new = copy.copy(action)
        new.type, new.choices = None, None
        new.help = f"comma list ({action.help})" if action.help else "comma list"
        p._actions[i] = new
        for opt in action.option_strings:
            p._option_string_actions[opt] = new
        for group in p._action_groups:
            group._group_actions[:] = [new if a is action else a for a in group._group_actions]


def _configs(args):
    from dataclasses import asdict

    from ditto.repro.runner import RunConfig, Skipped, expand_matrix

    threads = [int(t) for t in _csv(args.threads)] or [os.cpu_count() or 1]
    configs, skipped = [], []
    servers = [SERVER, *_servers(args)]
    if not args.no_matrix:
        configs, skipped = expand_matrix(
            _csv(args.backends),
            _csv(args.numerics),
            _csv(args.determinism),
            [int(b) for b in _csv(args.batch_sizes)],
            threads,
            servers=servers if getattr(args, "base_url", None) or not _servers(args) else servers[1:],
        )
    for spec in _csv(args.configs):
        cfg = RunConfig.parse(spec, threads[0])
        if mismatch := cfg.numerics_mismatch():
            skipped.append(Skipped(asdict(cfg), mismatch))
        elif cfg not in configs:
            configs.append(cfg)
    return configs, skipped


def _servers(args) -> dict[str, str]:
    """--server LABEL=URL flags as {label: url} (check_args has validated them)."""
    return dict(s.split("=", 1) for s in getattr(args, "server", None) or [])


def _engine_options(args) -> dict:
    opts = {}
    for k in ("kv_dtype", "max_num_batched_tokens", "prefill_chunk", "block_size", "kv_cache_gb"):
        v = getattr(args, k, None)
        if v is not None:
            opts[k] = v
    if getattr(args, "no_prefix_caching", False):
        opts["enable_prefix_caching"] = False
    if getattr(args, "base_url", None) or _servers(args):
        opts["openai"] = {
            "base_url": args.base_url,
            "servers": _servers(args),
            "api_key": args.api_key or os.environ.get("OPENAI_API_KEY") or None,
            "served_model": args.served_model,
            "timeout_s": args.request_timeout,
        }
    return opts


def check_args(args) -> None:
    """The matrix flags, sampling, task data and the model, before any model loads (UsageError naming the flag)."""
    from ditto import cli_checks as check
    from ditto.config import DETERMINISM_LEVELS
    from ditto.eval.prompts import FORMATS
    from ditto.eval.tasks.registry import TASKS

    check.check(args.task in TASKS, "task", "one of " + ", ".join(TASKS), args.task)
    check.check(args.prompt in FORMATS, "prompt", "one of " + ", ".join(FORMATS), args.prompt)
    check.positive(args, "limit", "max_num_batched_tokens", "prefill_chunk", "block_size")
    check.non_negative(args, "offset")
    check.positive_number(args, "kv_cache_gb")
    check.sampling_params(args)  # --temperature --top-p --top-k --seed --max-tokens
    names = check.numerics_names() + ["gguf"]
    for flag, values, known in (
        ("numerics", _csv(args.numerics), names),
        ("determinism", _csv(args.determinism), list(DETERMINISM_LEVELS)),
        ("backends", _csv(args.backends), ["ditto", "transformers", "llama_cpp", "openai"]),
    ):
        bad = [v for v in values if v not in known]
        check.check(not bad, flag, "a comma list of " + ", ".join(known), ",".join(bad))
    for flag in ("batch_sizes", "threads"):
        values = _csv(getattr(args, flag))
        check.check(
            all(v.isdigit() and int(v) >= 1 for v in values),
            flag,
            "a comma list of positive integers",
            getattr(args, flag),
        )
    check.model(args.model)
    from ditto.ray_pool import check_ray_args

    check_ray_args(args)
    specs = _csv(args.backends) * (not args.no_matrix) + [c.split(":")[0] for c in _csv(args.configs)]
    uses_server = "openai" in specs
    labels = _check_servers(args)
    default_server = args.base_url or (uses_server and not labels) or any(map(_names_default, _csv(args.configs)))
    if default_server:  # --base-url is needed and checked
        backend = "openai"
    elif labels:  # the named servers carry the other openai flags (key, timeout)
        backend, args = "openai", argparse.Namespace(**(vars(args) | {"base_url": next(iter(labels.values()))}))
    else:
        backend = "ditto"  # refuses stray openai flags
    check.backend_flags(argparse.Namespace(**(vars(args) | {"backend": backend})))
    from ditto.eval.tasks import get_task

    try:
        problems = get_task(args.task, data=args.data).load(args.limit, args.offset)
    except (FileNotFoundError, ValueError) as exc:
        raise check.UsageError(f"argument --data: {exc}") from None
    if not problems:
        raise check.UsageError(f"argument --offset: no problems left after skipping {args.offset}")


def _check_servers(args) -> dict[str, str]:
    """--server LABEL=URL flags, and every openai:LABEL config naming one of them."""
    from ditto import cli_checks as check

    labels: dict[str, str] = {}
    for spec in args.server or []:
        label, sep, url = spec.partition("=")
        ok = bool(sep and label and url) and label != SERVER and not set(label) & set(":,=/ ")
        check.check(ok, "server", f"LABEL=URL with a label free of ':,=/ ' (not {SERVER!r})", spec)
        check.check(label not in labels, "server", "one URL per label", spec)
        check.backend_flags(argparse.Namespace(backend="openai", base_url=url, served_model=None))
        labels[label] = url
    for spec in _csv(args.configs):
        parts = spec.split(":")
        if parts[0] == "openai" and not _names_default(spec):
            check.check(parts[1] in labels, "configs", "openai:LABEL naming a --server LABEL=URL", spec)
    return labels


def _names_default(spec: str) -> bool:
    """An openai config on the --base-url server (no server label in its numerics slot)."""
    parts = spec.split(":")
    return parts[0] == "openai" and (len(parts) < 2 or parts[1] in ("", "-", SERVER))


def _ray(args) -> dict | None:
    if args.ray is None:
        return None
    from ditto.ray_pool import ray_address

    return {"address": ray_address(args), "workers": args.ray_workers}


def run(args) -> int:
    from ditto.cli_checks import UsageError
    from ditto.repro.report import write_report
    from ditto.repro.runner import Workload, WorkloadMismatch, run_study

    if args.report_only:
        if not Path(args.out).is_dir():
            raise UsageError(f"argument --out: {args.out}: no such study folder")
        print(write_report(args.out, args.reference))
        return 0
    check_args(args)
    try:
        configs, skipped = _configs(args)
    except ValueError as exc:
        raise UsageError(f"argument --configs/--backends: {exc}") from None
    if not configs:
        print("ditto repro: no valid configuration to run", file=sys.stderr)
        for s in skipped:
            print(f"  skipped {s.config}: {s.reason}", file=sys.stderr)
        return 2
    workload = Workload(
        model=args.model,
        task=args.task,
        data=args.data,
        limit=args.limit,
        offset=args.offset,
        prompt=args.prompt,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )
    try:
        study = run_study(
            workload,
            configs,
            args.out,
            skipped=skipped,
            engine_options=_engine_options(args),
            progress=not args.no_progress,
            reference=args.reference,
            ray=_ray(args),
        )
    except WorkloadMismatch as exc:
        print(f"ditto repro: {exc}", file=sys.stderr)
        return 2
    if not study["configs"]:
        print("ditto repro: no configuration completed", file=sys.stderr)
        for s in study["skipped"]:
            print(f"  {s['config']}: {s['reason']}", file=sys.stderr)
        return 1
    metrics = json.loads((Path(args.out) / "metrics.json").read_text())
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        m = metrics
        print(
            f"{len(study['configs'])} configs ({len(study['ran'])} run, {len(study['reused'])} reused, "
            f"{len(study['skipped'])} skipped) x {m['prompts']} prompts: accuracy {100 * m['accuracy_mean']:.1f}% "
            f"+- {100 * m['accuracy_std']:.2f} pts; distinct outputs/prompt {m['distinct_outputs_mean']:.2f}; "
            f"pairwise exact agreement {100 * m['exact_agreement_mean']:.1f}%\nreport: {args.out}/report.md"
        )
    return 0
