"""The evaluation runner: problems -> prompts -> Backend.generate -> grading -> results.jsonl -> report.

Usage from Python (any object implementing ditto.backends.base.Backend works)::

    from ditto.eval.runner import EvalConfig, run_eval
    summary = run_eval(backend, EvalConfig(task="gsm8k", limit=200, n=8, temperature=0.7, seed=0), "runs/x")

Output folder:
  manifest.json   the whole inference stack (backend.info(), sampling, prompt template, grader, versions...)
  results.jsonl   one line per problem, appended + fsync'ed as soon as it is graded (resumable)
  summary.json    the metrics (ditto.eval.metrics.summarize)
  report.md / report.html / plots/*.png

Resumption: running again into the same folder skips problems whose record is already in
results.jsonl and drops a torn last line left by a kill, so nothing is lost or counted twice.
The config must match (except --limit, batch sizes and grader settings); else ResumeMismatch.

Seeds: problem p is sampled with seed = sha256(f"{seed}:{p.id}") mod 2^31 (see `problem_seed`), so
a problem's samples do not depend on batching, order, --limit or resumption (on backends whose
sampling is counter-based, such as ditto's own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ditto.eval import grading
from ditto.eval.manifest import build_manifest, resume_key, write_json_atomic
from ditto.eval.metrics import summarize
from ditto.eval.prompts import PromptTemplate
from ditto.eval.tasks import get_task
from ditto.sampling import SamplingParams

log = logging.getLogger("ditto.eval")

SEED_RULE = "per-problem seed = int.from_bytes(sha256(f'{seed}:{problem_id}')[:8], 'big') % 2**31"
_TEST_DELAY_ENV = "DITTO_EVAL_TEST_BATCH_DELAY"  # test hook: seconds to sleep after each written batch


class ResumeMismatch(RuntimeError):
    pass


@dataclass
class EvalConfig:
    task: str = "gsm8k"
    data: str | None = None
    limit: int | None = None
    offset: int = 0
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    max_tokens: int = 512
    prompt: str = "chat"
    shots: int = 0
    thousands: bool = False
    system: str | None = None
    arith_digits: str = "1"
    arith_steps: str = "1"
    arith_count: int = 200
    arith_ops: str = "+-*"
    arith_seed: int = 0  # which problems (independent of the sampling seed, so runs can be paired)
    batch_problems: int = 16
    keep_tokens: bool = False  # each sample's token ids and logprobs in results.jsonl
    grader_timeout: float = grading.DEFAULT_TIMEOUT_S
    grader_workers: int = 2

    @classmethod
    def from_args(cls, args) -> EvalConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})

    def template(self) -> PromptTemplate:
        return PromptTemplate(format=self.prompt, shots=self.shots, thousands=self.thousands, system=self.system)

    def sampling(self, stop: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            max_tokens=self.max_tokens,
            stop=stop,
        )

    def make_task(self):
        return get_task(
            self.task,
            data=self.data,
            digits=self.arith_digits,
            steps=self.arith_steps,
            count=self.arith_count,
            seed=self.arith_seed,
            ops=self.arith_ops,
        )


def problem_seed(seed: int, problem_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:8], "big") % 2**31


# ----------------------------------------------------------------------------------------------
# results.jsonl
# ----------------------------------------------------------------------------------------------


def load_results(path: str | os.PathLike) -> list[dict]:
    """Complete records of a results file; a torn or unparsable last line is ignored, duplicates dropped."""
    path = Path(path)
    if not path.exists():
        return []
    out, seen = [], set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the torn tail of a killed run
                continue
            raise
        if i == len(lines) - 1 and not data.endswith(b"\n"):
            continue  # complete JSON but no newline: treat as torn (the write did not finish)
        if rec["id"] not in seen:
            seen.add(rec["id"])
            out.append(rec)
    return out


def _repair_tail(path: Path) -> int:
    """Truncate a torn last line (no trailing newline) so appends start on a fresh line. Returns bytes cut."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        chunk = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            k = buf.rfind(b"\n")
            if k >= 0:
                keep = start + k + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


class _ResultsWriter:
    def __init__(self, path: Path):
        self.path = path
        cut = _repair_tail(path)
        if cut:
            log.warning("results.jsonl: dropped a torn last line (%d bytes) left by an interrupted run", cut)
        self.f = open(path, "ab")  # noqa: SIM115 - held open for the whole run, closed in close()

    def write(self, rec: dict) -> None:
        self.f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("[bold]eval[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    prog.start()
    prog.add_task("", total=total, completed=done)
    return prog


def run_eval(
    backend, config: EvalConfig, out_dir: str | os.PathLike, *, progress: bool = True, report: bool = True
) -> dict:
    """Evaluate `backend` on `config`, writing into `out_dir` (resuming if it holds a matching run).

    Returns the summary metrics (also written to summary.json).
    """
    run = open_run(config, out_dir, backend.info(), progress)
    delay = float(os.environ.get(_TEST_DELAY_ENV, "0") or 0)
    try:
        todo = run.todo()
        for start in range(0, len(todo), max(1, config.batch_problems)):
            batch = todo[start : start + config.batch_problems]
            run.write(batch_records(run.grader, batch, *generate_batch(backend, batch, run.unit_spec()), config))
            if delay:
                time.sleep(delay)
    finally:
        run.session["engine_stats"] = engine_stats(backend)
        run.close()
    return run.finish(report)


@dataclass
class UnitSpec:
    """What a worker needs to generate a batch of problems, besides the problems (picklable)."""

    template: PromptTemplate
    task_name: str
    params: SamplingParams
    seed: int


class EvalRun:
    """An open run folder: the manifest (with this session), results.jsonl open for appends, the records
    already there, the grader pool and the progress bar. The single writer of the folder."""

    def __init__(self, config: EvalConfig, out_dir: str | os.PathLike, binfo: dict, progress: bool) -> None:
        self.config, self.out = config, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.task = config.make_task()
        self.problems = self.task.load(limit=config.limit, offset=config.offset)
        self.template = config.template()
        self.base_params = config.sampling(stop=self.template.stop())
        self.manifest_path, results_path = self.out / "manifest.json", self.out / "results.jsonl"
        self.manifest = _open_manifest(
            self.out, config, binfo, self.task, self.template, self.base_params, self.problems
        )
        self.session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_unix": time.time()}
        self.session["limit"] = config.limit
        self.manifest.setdefault("sessions", []).append(self.session)
        write_json_atomic(self.manifest_path, self.manifest)
        self.writer = _ResultsWriter(results_path)
        self.done = {r["id"]: r for r in load_results(results_path)}
        n_todo = len(self.todo())
        self.session["resumed_with"] = len(self.problems) - n_todo
        self.tally = _Tally(self.done.values(), _progress(progress, len(self.problems), len(self.problems) - n_todo))
        self.grader = grading.GraderPool(config.grader_workers, config.grader_timeout)
        self.grader.__enter__()

    def todo(self) -> list:
        return [p for p in self.problems if p.id not in self.done]

    def unit_spec(self) -> UnitSpec:
        return UnitSpec(self.template, self.task.name, self.base_params, self.config.seed)

    def write(self, records: list[dict]) -> None:
        for rec in records:
            if rec["id"] in self.done:  # never twice, whatever the caller hands in
                continue
            self.writer.write(rec)
            self.done[rec["id"]] = rec
            self.tally.add(rec)

    def close(self) -> None:
        self.session["grader_timeouts"] = self.grader.timeouts
        self.grader.__exit__(None, None, None)
        self.writer.close()
        self.tally.stop()

    def finish(self, report: bool) -> dict:
        records = [self.done[p.id] for p in self.problems if p.id in self.done]
        return finish_run(
            self.out, self.task.name, records, self.config.seed, self.session, self.manifest, self.manifest_path, report
        )


def open_run(config: EvalConfig, out_dir: str | os.PathLike, binfo: dict, progress: bool = True) -> EvalRun:
    """Open (or resume) the run folder `out_dir` for `config` on a backend described by `binfo`."""
    return EvalRun(config, out_dir, binfo, progress)


def _open_manifest(out: Path, config: EvalConfig, binfo: dict, task, template, base_params, problems) -> dict:
    """The manifest of the run in `out`: the existing one when it is the same run (ResumeMismatch
    naming what differs otherwise), else a new one recording the whole inference stack."""
    cfg = asdict(config)
    prompt_rec = template.record(task.name)
    manifest_path, results_path = out / "manifest.json", out / "results.jsonl"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("resume_key") != resume_key(cfg, binfo, prompt_rec):
            diffs = [k for k in cfg if old.get("config", {}).get(k) != cfg[k]]
            if old.get("backend", {}).get("model_digest") != binfo.get("model_digest"):
                diffs.append("model_digest")
            if old.get("prompt_template", {}).get("sha256") != prompt_rec.get("sha256"):
                diffs.append("prompt_template")
            raise ResumeMismatch(
                f"{out} holds a different run (differs in: {', '.join(diffs) or 'backend'}); "
                "use another --out or delete the folder"
            )
        return old
    if results_path.exists() and results_path.stat().st_size:
        raise ResumeMismatch(f"{results_path} exists without a manifest.json; refusing to mix runs")
    return build_manifest(
        config=cfg,
        backend_info=binfo,
        task_info=task.info(),
        prompt_record=prompt_rec,
        sampling=base_params.record(),
        seed_rule=SEED_RULE,
        grader=grading.grader_info(config.grader_timeout, config.grader_workers),
        problems=[p.id for p in problems],
        batch={
            "problems_per_generate_call": config.batch_problems,
            "backend_batch_size": binfo.get("batch_size"),
            "samples_per_problem": config.n,
        },
    )


class _Tally:
    """Correct / graded samples so far (resumed records included), shown on the progress bar."""

    def __init__(self, records, bar):
        records = list(records)
        self.correct = sum(s["correct"] for r in records for s in r["samples"])
        self.samples = sum(len(r["samples"]) for r in records)
        self.bar = bar

    def add(self, rec: dict) -> None:
        self.correct += rec["n_correct"]
        self.samples += rec["n"]
        if self.bar:
            acc = f"acc {self.correct / max(1, self.samples):.3f} ({self.correct}/{self.samples})"
            self.bar.update(self.bar.task_ids[0], advance=1, description=acc)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()


def generate_batch(backend, batch: list, spec: UnitSpec) -> tuple[list[str], list[SamplingParams], list, float]:
    """One generate call for a batch of problems, each with its own seed: (prompts, params, outputs, seconds).
    What a Ray worker runs (ditto.eval.ray_eval); the driver grades."""
    prompts = [spec.template.render(p, spec.task_name, backend) for p in batch]
    params = [spec.params.replace(seed=problem_seed(spec.seed, p.id)) for p in batch]
    t0 = time.perf_counter()
    outs = backend.generate(prompts, params)
    return prompts, params, outs, time.perf_counter() - t0


def batch_records(pool, batch, prompts, params, outs, gen_s: float, config: EvalConfig) -> list[dict]:
    """Every sample of a generated batch graded: one record per problem."""
    grades = iter(pool.grade([(p.answer, c.text) for p, o in zip(batch, outs) for c in o.outputs]))
    records = []
    for p, o, prompt, sp in zip(batch, outs, prompts, params):
        samples = [_sample_record(p, c, next(grades), config.keep_tokens) for c in o.outputs]
        records.append(
            {
                "id": p.id,
                "difficulty": p.difficulty,
                "gold": p.answer,
                "question": p.question,
                "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                "seed": sp.seed,
                "seconds": gen_s / len(batch),
                "n": len(samples),
                "n_correct": sum(s["correct"] for s in samples),
                "samples": samples,
                "backend_metrics": {k: v for k, v in o.metrics.items() if isinstance(v, (int, float, str))},
            }
        )
    return records


def _sample_record(problem, completion, g, keep_tokens: bool = False) -> dict:
    """One graded sample of `problem` (warnings logged for grader disagreements and timeouts)."""
    if g.disagreement:
        log.warning(
            "grader disagreement on %s sample %d: gold=%r answer=%r math_verify=%s fallback=%s",
            problem.id,
            completion.index,
            problem.answer,
            g.extracted,
            g.math_verify,
            g.fallback,
        )
    if g.status == "timeout":
        log.warning("grading timed out on %s sample %d (answer %r)", problem.id, completion.index, g.extracted)
    rec = {
        "index": completion.index,
        "text": completion.text,
        "answer": g.extracted,
        "key": grading.answer_key(g.extracted),
        "correct": g.correct,
        "status": g.status,
        "method": g.method,
        "math_verify": g.math_verify,
        "fallback": g.fallback,
        "disagreement": g.disagreement,
        "grade_error": g.error,
        "n_tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
    }
    if keep_tokens:  # --keep-tokens: what bit-identity is checked on (json floats round-trip exactly)
        rec["token_ids"] = [int(t) for t in completion.token_ids]
        rec["logprobs"] = [float(x) for x in completion.logprobs]
    return rec


def engine_stats(backend, second=None) -> dict:
    """The engines' counters (steps, tokens, preemptions, prefix hits) since they started, per model, for
    backends that keep them (ditto's LLM); what a run's numbers were computed under."""
    stats = {}
    for label, b in (("policy", backend), ("second", second)):
        if b is not None and callable(getattr(b, "engine_stats", None)):
            stats[label] = b.engine_stats()
    return stats


def finish_run(out, task_name, records, seed, session, manifest, manifest_path, report, extra=None) -> dict:
    """Summarise finished records, stamp the manifest session, write summary.json and the report."""
    summary = summarize(records, seed=seed)
    summary["task"] = task_name
    summary["run"] = str(out)
    summary.update(extra or {})
    if "started_unix" in session:
        session["seconds"] = round(time.time() - session["started_unix"], 1)
    # wall time of the run: every session that did work (a resumed run adds its sessions up)
    summary["wall_seconds"] = round(sum(s.get("seconds", 0.0) for s in manifest.get("sessions", [])), 1)
    write_json_atomic(out / "summary.json", summary)
    session["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    session["problems_done"] = len(records)
    write_json_atomic(manifest_path, manifest)
    if report:
        from ditto.eval.report import write_report

        write_report(out)
    return summary
