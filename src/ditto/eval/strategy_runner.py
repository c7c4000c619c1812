"""`ditto eval --strategy NAME --budget TOKENS`: solve each problem with a reasoning strategy.

Instead of plain sampling, every problem goes through
``get_strategy(NAME, **args).run(problem.question, backend, Budget(max_generated_tokens=TOKENS, ...))``.
The run folder has the same shape as a plain run (manifest.json, resumable results.jsonl, summary.json,
report.*), so resumption, reports and `ditto eval compare` work unchanged. Each record holds one
"sample" (the strategy's answer, graded by the same GraderPool as plain runs; ``n_tokens`` is the
generated-token cost of the whole strategy) plus:

  cost    the strategy's Cost (generated/scored tokens, model calls, scorer calls, sandbox runs, wall s)
  calls   every backend call as the backend saw it: model (policy/second), op (generate/score) and the
          token count of each completion / scored continuation (an independent check of `cost`)
  trace   the strategy's trace, compacted (long strings cut, long lists truncated)

Problems run concurrently (``--batch-problems``, each on its own thread) when the backend is thread-safe:
ditto's LLM lets every thread's generate/score requests join one continuous batch, so a strategy that
issues small calls still keeps the engine's batch full. Records are written as problems finish.

Strategy arguments come from ``--strategy-arg k=v`` (values parsed as JSON, else kept as strings):
``n=auto`` means ``budget // max_tokens`` samples; ``instruction=eval`` swaps the strategy's
\\boxed{} instruction for the plain runner's chat instruction (or give a template with {problem});
``prompt=task`` renders the policy's prompt with the eval's ``--prompt`` format instead (``chat`` or
``chat-fewshot``: the task's exemplars as earlier chat turns; tool strategies keep their protocol);
``scorer=second`` scores with the second model (``--second-model``), ``scorer=self`` with the policy.
chunk_guided and glimp_router get the second model as their large model; glimp_router's
``threshold=calibrate`` sets its entropy threshold once per run from held-out problems of the same task
(``calibration_problems=20`` problems after the evaluated ones, ``large_fraction=0.25`` of steps to the
large model), recorded in the manifest and reused on resume. Strategies that take a
``seed`` get the per-problem seed of the plain runner unless ``seed`` is given.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ditto.eval import grading
from ditto.eval.manifest import RESUME_FREE_FIELDS, build_manifest, resume_key, write_json_atomic
from ditto.eval.runner import (
    EvalConfig,
    ResumeMismatch,
    _progress,
    _ResultsWriter,
    engine_stats,
    finish_run,
    load_results,
    problem_seed,
)
from ditto.eval.tasks.base import Problem

log = logging.getLogger("ditto.eval")

TWO_MODEL = ("chunk_guided", "glimp_router")  # take the second model as `large`
SEED_RULE = "strategy seed = per-problem seed (sha256(f'{seed}:{problem_id}')[:8] mod 2**31) unless --strategy-arg seed"
CALIBRATION_ARGS = ("calibration_problems", "large_fraction")  # knobs of threshold=calibrate, not of the strategy
MAX_STR = 300
MAX_LIST = 64


@dataclass
class StrategySpec:
    name: str
    budget: int | None = None  # max generated tokens per problem (all models, all calls)
    args: dict = field(default_factory=dict)
    second_model: str | None = None
    max_samples: int | None = None
    max_model_calls: int | None = None

    def record(self) -> dict:
        return asdict(self)


def _value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def parse_strategy_args(items: list[str] | None) -> dict:
    """['n=8', 'temperature=0.7', 'mode=cgs'] -> {'n': 8, 'temperature': 0.7, 'mode': 'cgs'}."""
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--strategy-arg expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = _value(val.strip())
    return out


class RunCancelled(RuntimeError):
    """The run was interrupted: strategies still in flight stop at their next backend call."""


class RecordingBackend:
    """Forwards everything to `backend`; logs the token counts of every generate/score call.

    `cancel` (a threading.Event) makes the next call raise RunCancelled, so that problems still in
    flight on worker threads stop quickly when the run is interrupted.
    """

    def __init__(self, backend, label: str, calls: list, cancel: threading.Event | None = None):
        self._backend = backend
        self.label = label
        self.calls = calls
        self.cancel = cancel

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RunCancelled("run interrupted")

    def generate(self, prompts, params=None, **kw):
        self._check()
        outs = self._backend.generate(prompts, params, **kw)
        toks = [len(c.token_ids) for ro in outs for c in ro.outputs]
        self.calls.append({"model": self.label, "op": "generate", "prompts": len(outs), "tokens": toks})
        return outs

    def score(self, prompt, continuation, **kw):
        self._check()
        out = self._backend.score(prompt, continuation, **kw)
        self.calls.append({"model": self.label, "op": "score", "tokens": [len(out.token_ids)]})
        return out

    def __getattr__(self, name):
        return getattr(self._backend, name)


def build_strategy(spec: StrategySpec, max_tokens: int, seed: int | None = None, second=None, renderer=None):
    """The Strategy for one problem: `spec.args` resolved (n=auto, scorer=..., large model, seed);
    `renderer` (backend, problem) -> prompt when the spec asks for prompt=task."""
    from ditto.strategies import LikelihoodScorer, get_strategy
    from ditto.strategies.base import _REGISTRY

    if spec.name not in _REGISTRY:
        get_strategy(spec.name)  # raises KeyError listing the known names
    kw = {k: v for k, v in spec.args.items() if k not in CALIBRATION_ARGS}
    if kw.get("n") == "auto":
        if spec.budget is None:
            raise ValueError("n=auto needs --budget")
        kw["n"] = max(1, spec.budget // max(1, max_tokens))
    if "scorer" in kw:
        if kw["scorer"] == "second":
            if second is None:
                raise ValueError("scorer=second needs --second-model")
            kw["scorer"] = LikelihoodScorer(second)
        elif kw["scorer"] == "self":
            kw["scorer"] = LikelihoodScorer()
        else:
            raise ValueError(f"unknown scorer {kw['scorer']!r} (expected 'self' or 'second')")
    if spec.name in TWO_MODEL:
        if second is None:
            raise ValueError(f"strategy {spec.name} needs --second-model (its larger model)")
        kw.setdefault("large", second)
    instruction = kw.pop("instruction", None)
    prompt = kw.pop("prompt", None)
    if prompt not in (None, "task"):
        raise ValueError(f"prompt={prompt!r}: only prompt=task (the eval's --prompt format) is known")
    params = _init_params(_REGISTRY[spec.name])
    if kw.get("threshold") == "calibrate" and spec.name != "glimp_router":
        raise ValueError("threshold=calibrate is glimp_router's (entropy threshold from held-out problems)")
    unknown = sorted(set(kw) - set(params))
    if unknown:
        known = ", ".join(k for k in params if k not in ("large", "scorer")) or "none"
        raise ValueError(f"strategy {spec.name} has no argument {', '.join(unknown)} (it takes: {known})")
    if "seed" in params and "seed" not in kw and seed is not None:
        kw["seed"] = seed
    strategy = get_strategy(spec.name, **kw)
    if instruction is not None:
        strategy.instruction = resolve_instruction(instruction)
    if prompt == "task":
        if renderer is None:
            raise ValueError("prompt=task needs the eval's prompt template")
        strategy.prompt_renderer = renderer
    return strategy


def _init_params(cls) -> list[str]:
    """Keyword arguments a strategy class takes, following **kw up to its base classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in sig if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind == p.VAR_KEYWORD for p in sig):
            break
    return names


def task_renderer(config: EvalConfig, task_name: str):
    """(backend, problem text) -> the eval's prompt for it, in a chat format strategies can extend."""
    template = config.template()
    if template.format not in ("chat", "chat-fewshot"):
        raise ValueError(
            f"prompt=task needs --prompt chat or chat-fewshot (strategies continue chat turns), not {template.format}"
        )

    def render(backend, problem: str) -> str:
        return template.render(Problem(id="", question=problem, answer=""), task_name, backend)

    return template, render


def resolve_instruction(value: str) -> str:
    """'eval': the plain runner's chat instruction ("... The answer is N."); else a template with {problem}."""
    if value == "eval":
        from ditto.eval.prompts import INSTRUCTIONS

        return INSTRUCTIONS["default"].replace("{", "{{").replace("}", "}}") + "\n\n{problem}"
    if "{problem}" not in value:
        raise ValueError("instruction must be 'eval' or a template containing {problem}")
    return value


def compact(obj, depth: int = 0):
    """A JSON-safe, bounded copy of a trace."""
    if depth > 6:
        return "..."
    if isinstance(obj, float):
        return round(obj, 6) if obj == obj and abs(obj) != float("inf") else str(obj)
    if isinstance(obj, str):
        return obj if len(obj) <= MAX_STR else obj[:MAX_STR] + f"...[{len(obj) - MAX_STR} more chars]"
    if isinstance(obj, bool | int) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): compact(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        items = [compact(v, depth + 1) for v in list(obj)[:MAX_LIST]]
        if len(obj) > MAX_LIST:
            items.append(f"...[{len(obj) - MAX_LIST} more]")
        return items
    return getattr(obj, "name", type(obj).__name__)


def mean_cost(records: list[dict]) -> dict:
    keys = ("generated_tokens", "scored_tokens", "model_calls", "scorer_calls", "sandbox_runs", "wall_time_s")
    n = max(1, len(records))
    total = {k: sum(r.get("cost", {}).get(k, 0) for r in records) for k in keys}
    return {"mean": {k: v / n for k, v in total.items()}, "total": total}


def run_strategy_eval(
    backend,
    config: EvalConfig,
    spec: StrategySpec,
    out_dir: str | os.PathLike,
    *,
    second=None,
    progress: bool = True,
    report: bool = True,
) -> dict:
    """Evaluate strategy `spec` on `config`'s problems with `backend` (and `second`), into `out_dir`."""
    from ditto.strategies import Budget

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = config.make_task()
    problems = task.load(limit=config.limit, offset=config.offset)
    budget = Budget(
        max_generated_tokens=spec.budget,
        max_samples=spec.max_samples,
        max_tokens=config.max_tokens,
        max_model_calls=spec.max_model_calls,
    )
    renderer = None
    if spec.args.get("prompt") == "task":
        template, renderer = task_renderer(config, task.name)
    example = build_strategy(spec, config.max_tokens, seed=config.seed, second=second, renderer=renderer)
    for scored in example.scoring_backends(backend):  # a backend that cannot score: refuse before any work
        if callable(getattr(scored, "require_scoring", None)):
            scored.require_scoring()
    instruction = example.instruction
    if renderer is not None and example.uses_task_prompt:
        prompt_rec = template.record(task.name) | {"note": "strategy prompts rendered with the eval's template"}
    else:
        prompt_rec = {
            "format": "strategy",
            "instruction": instruction,
            "sha256": hashlib.sha256(instruction.encode()).hexdigest(),
            "note": "strategies format their own prompts (chat template + instruction); --prompt is unused",
        }
    binfo = backend.info()
    cfg = asdict(config) | {"strategy": spec.record()}
    strat_rec = {
        "name": spec.name,
        "args": spec.args,
        "config": compact(example.config()),
        "budget": asdict(budget),
        "second_model": spec.second_model,
        "second_backend": second.info() if second is not None else None,
        "seed_rule": SEED_RULE,
    }
    manifest_path = out / "manifest.json"
    results_path = out / "results.jsonl"
    second_digest = (strat_rec["second_backend"] or {}).get("model_digest")
    key_info = binfo | {"model_digest": f"{binfo.get('model_digest')}+{second_digest}"}
    key = resume_key(cfg, key_info, prompt_rec)
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("resume_key") != key:
            old = manifest.get("config", {})
            diffs = [k for k in cfg if old.get(k) != cfg[k] and k not in RESUME_FREE_FIELDS]
            raise ResumeMismatch(
                f"{out} holds a different run (differs in: {', '.join(diffs) or 'backend'}); "
                "use another --out or delete the folder"
            )
    else:
        if results_path.exists() and results_path.stat().st_size:
            raise ResumeMismatch(f"{results_path} exists without a manifest.json; refusing to mix runs")
        manifest = build_manifest(
            config=cfg,
            backend_info=binfo,
            task_info=task.info(),
            prompt_record=prompt_rec,
            sampling={"controlled_by": "strategy", "max_tokens_per_completion": config.max_tokens},
            seed_rule=SEED_RULE,
            grader=grading.grader_info(config.grader_timeout, config.grader_workers),
            problems=[p.id for p in problems],
            batch={"problems_in_flight": concurrency(config.batch_problems, backend, second)},
        )
        manifest["resume_key"] = key
        manifest["strategy"] = strat_rec
    if spec.args.get("threshold") == "calibrate":
        cal = manifest["strategy"].get("calibration") or calibrate_threshold(
            spec, config, [p.id for p in problems], backend, example
        )
        manifest["strategy"]["calibration"] = cal
        spec = replace(spec, args=spec.args | {"threshold": cal["threshold"]})
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_unix": time.time(), "limit": config.limit}
    manifest.setdefault("sessions", []).append(session)
    write_json_atomic(manifest_path, manifest)

    writer = _ResultsWriter(results_path)
    done = {r["id"]: r for r in load_results(results_path)}
    todo = [p for p in problems if p.id not in done]
    session["resumed_with"] = len(problems) - len(todo)
    workers = concurrency(config.batch_problems, backend, second)
    session["problems_in_flight"] = workers
    n_correct = sum(r["n_correct"] for r in done.values())
    prog = _progress(progress, len(problems), len(problems) - len(todo))
    cancel = threading.Event()

    def solve(p):
        """Run the strategy on one problem (a worker thread; backend calls share the engine's batch)."""
        calls: list[dict] = []
        policy = RecordingBackend(backend, "policy", calls, cancel)
        second_rec = RecordingBackend(second, "second", calls, cancel) if second is not None else None
        seed = problem_seed(config.seed, p.id)
        strategy = build_strategy(spec, config.max_tokens, seed=seed, second=second_rec, renderer=renderer)
        return p, seed, strategy.run(p.question, policy, budget), calls

    pool_ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="strategy")
    try:
        with grading.GraderPool(config.grader_workers, config.grader_timeout) as pool:
            futures = [pool_ex.submit(solve, p) for p in todo]
            for fut in as_completed(futures):
                p, seed, res, calls = fut.result()
                rec = _record(p, seed, spec.name, res, calls, pool)
                writer.write(rec)
                done[p.id] = rec
                n_correct += rec["n_correct"]
                if prog:
                    n_done = len(done)
                    prog.update(
                        prog.task_ids[0], advance=1, description=f"acc {n_correct / n_done:.3f} ({n_correct}/{n_done})"
                    )
            session["grader_timeouts"] = pool.timeouts
    finally:
        cancel.set()  # problems still in flight stop at their next backend call
        pool_ex.shutdown(wait=True, cancel_futures=True)
        session["engine_stats"] = engine_stats(backend, second)
        writer.close()
        if prog:
            prog.stop()
    records = [done[p.id] for p in problems if p.id in done]
    extra = {"strategy": {"name": spec.name, "budget": spec.budget, "args": spec.args}, "cost": mean_cost(records)}
    return finish_run(out, task.name, records, config.seed, session, manifest, manifest_path, report, extra)


def calibrate_threshold(spec: StrategySpec, config: EvalConfig, used_ids: list[str], backend, router) -> dict:
    """GlimpRouter's threshold from held-out problems of the same task: the first
    `calibration_problems` problems after the evaluated ones (generated tasks get more problems per
    level; the evaluated ones keep their ids), solved with `router`'s prompt and step length.
    Returns the manifest's calibration record."""
    from ditto.strategies import calibrate_glimp_threshold

    n = int(spec.args.get("calibration_problems", 20))
    frac = float(spec.args.get("large_fraction", 0.25))
    wider = replace(config, arith_count=config.arith_count + n)  # tasks other than arith ignore it
    used = set(used_ids)
    held = [p for p in wider.make_task().load(limit=len(used_ids) + n, offset=config.offset) if p.id not in used][:n]
    if not held:
        raise ValueError("threshold=calibrate: the task has no problems beyond the evaluated ones")
    threshold = calibrate_glimp_threshold(
        backend,
        [p.question for p in held],
        large_fraction=frac,
        max_steps=router.max_steps,
        step_tokens=router.step_tokens,
        prompt_fn=router.prompt,
        workers=concurrency(config.batch_problems, backend),
    )
    return {"threshold": threshold, "large_fraction": frac, "problems": [p.id for p in held]}


def concurrency(requested: int, backend, second=None) -> int:
    """Problems solved at once: `requested` on thread-safe backends (ditto's LLM: every thread's
    requests join one continuous batch), else 1. In determinism `fast`, which problems share a batch
    can change low bits of the results; batch_invariant and exact runs are unaffected."""
    safe = getattr(backend, "thread_safe", False) and (second is None or getattr(second, "thread_safe", False))
    return max(1, requested) if safe else 1


def _record(p, seed: int, name: str, res, calls: list[dict], pool) -> dict:
    """The results.jsonl record of one solved problem: the strategy's answer graded like a sample."""
    response = f"\\boxed{{{res.answer}}}" if res.answer is not None else ""
    (g,) = pool.grade([(p.answer, response)])
    if g.disagreement:
        log.warning("grader disagreement on %s: gold=%r answer=%r", p.id, p.answer, g.extracted)
    sample = {
        "index": 0,
        "text": res.text,
        "answer": g.extracted,
        "key": grading.answer_key(g.extracted),
        "correct": g.correct,
        "status": g.status,
        "method": "strategy",
        "math_verify": g.math_verify,
        "fallback": g.fallback,
        "disagreement": g.disagreement,
        "grade_error": g.error,
        "n_tokens": res.cost.generated_tokens,
        "finish_reason": "budget" if "budget_exhausted" in res.trace else "done",
    }
    return {
        "id": p.id,
        "difficulty": p.difficulty,
        "gold": p.answer,
        "question": p.question,
        "strategy": name,
        "seed": seed,
        "seconds": res.cost.wall_time_s,
        "n": 1,
        "n_correct": int(g.correct),
        "samples": [sample],
        "cost": asdict(res.cost),
        "calls": list(calls),
        "trace": compact(res.trace),
    }


def second_backend(args, make_backend):
    """The second model, built by `make_backend` from a copy of `args` with --model swapped (same numerics)."""
    if not getattr(args, "second_model", None):
        return None
    args2 = copy.copy(args)
    args2.model = args.second_model
    return make_backend(args2)


def run_from_args(args, make_backend, config: EvalConfig, out: str) -> dict:
    """`ditto eval --strategy ...`: build the spec and backends from parsed CLI args and run."""
    spec = StrategySpec(
        name=args.strategy,
        budget=args.budget,
        args=parse_strategy_args(args.strategy_arg),
        second_model=args.second_model,
    )
    from ditto.strategies import available_strategies

    if spec.name not in available_strategies():
        raise ValueError(f"unknown strategy {spec.name!r}; known: {', '.join(available_strategies())}")
    backend = make_backend(args)
    second = second_backend(args, make_backend)
    return run_strategy_eval(backend, config, spec, out, second=second, progress=args.progress)
