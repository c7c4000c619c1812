"""`ditto eval --ray`: the problems of a run over a Ray cluster, into the same run folder.

The problems are cut into fixed units of `--batch-problems` consecutive problems (unit i holds problems
[i*B, (i+1)*B) of the task's list, whatever has been done already); each unit is one generate call on
one worker (ditto.ray_pool: one engine per worker, one torch thread). This process grades the units as
they come back and appends their records to results.jsonl, so the folder is the one a single process
writes: the same manifest, the same resumption (a resumed job skips finished units and runs only the
missing problems of a unit cut short), the same report. A unit whose worker died is redone on a fresh
worker; a record is never written twice. Every problem's seed derives from the run seed and its id, so
under `batch_invariant` (at one thread) and `exact` the records' tokens and logprobs are those of a
single process, whatever the number of workers and the unit size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from ditto.eval.runner import EvalConfig, UnitSpec, batch_records, engine_stats, generate_batch, open_run
from ditto.ray_pool import WorkerPool


def _info(backend) -> dict:
    return backend.info()


def _stats(backend) -> dict:
    return engine_stats(backend)


def _generate(spec: UnitSpec, backend, batch: list):
    return generate_batch(backend, batch, spec)


def units(problems: list, size: int, done: set[str]) -> list[tuple[str, list]]:
    """Fixed units of `size` consecutive problems, keyed by their first problem's position; each keeps
    only its problems not in `done`, and a unit with none left is skipped."""
    size = max(1, size)
    out = []
    for start in range(0, len(problems), size):
        todo = [p for p in problems[start : start + size] if p.id not in done]
        if todo:
            out.append((f"u{start // size:05d}", todo))
    return out


def run_eval_ray(
    factory: Callable[[], object],
    config: EvalConfig,
    out_dir: str | os.PathLike,
    *,
    address: str = "local",
    workers: int | None = None,
    progress: bool = True,
    report: bool = True,
) -> dict:
    """Evaluate like run_eval, each worker's backend built by `factory()` (picklable). Returns the summary."""
    n_problems = len(config.make_task().load(limit=config.limit, offset=config.offset))
    max_workers = -(-n_problems // max(1, config.batch_problems))
    with WorkerPool(factory, address=address, workers=workers, max_workers=max_workers) as pool:
        run = open_run(config, out_dir, pool.call(_info), progress)
        try:
            work = units(run.problems, config.batch_problems, set(run.done))
            batches = dict(work)
            run.session["ray"] = {"units": len(work), "unit_problems": config.batch_problems}
            for key, (prompts, params, outs, gen_s) in pool.map(partial(_generate, run.unit_spec()), work):
                run.write(batch_records(run.grader, batches[key], prompts, params, outs, gen_s, config))
            run.session["ray"] |= pool.record()
            run.session["engine_stats"] = {f"worker{i}": s for i, s in enumerate(pool.call_all(_stats))}
        finally:
            run.close()
    return run.finish(report)
