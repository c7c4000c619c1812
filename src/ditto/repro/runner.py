"""The study runner: one workload x a matrix of inference configurations -> per-config results.

A *workload* is a task subset rendered to prompt token ids once (ditto's tokenizer and chat-template
renderer on the model file), plus one SamplingParams recipe (greedy or seeded sampling). Every
configuration receives the same token ids, so differences come from the engine, not the prompt.

A *configuration* is backend x numerics x determinism x batch size x threads:
- ditto: batch size = ``max_num_seqs``; all prompts are submitted at once, so the engine really
  runs that many sequences per step (continuous batching refills finished slots).
- transformers: batch size = the number of prompts per ``generate`` call (left padded);
  numerics fp32 / bf16 / fp16; determinism "none".
- llama_cpp: one sequence at a time (batch 1 only); numerics = the GGUF as llama.cpp runs it.
Invalid combinations are skipped with a reason (integer numerics <-> determinism exact).

Output folder::

  study.json                  workload, config list, skipped configs with reasons
  configs/<name>/results.jsonl one line per prompt: id, token_ids, text, answer, gold, correct, ...
  configs/<name>/manifest.json the config, backend.info(), timings, "complete": true
  report.md / report.html / plots/

Resumable per config: a config whose manifest says complete for this workload is not run again.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ditto.config import check_numerics
from ditto.eval import grading
from ditto.eval.manifest import write_json_atomic
from ditto.eval.prompts import PromptTemplate
from ditto.eval.runner import problem_seed
from ditto.eval.tasks import get_task
from ditto.sampling import SamplingParams

BACKENDS = ("ditto", "transformers", "llama_cpp", "openai")
SERVER = "server"  # the openai backend's numerics and determinism: whatever the server runs
HF_NUMERICS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class WorkloadMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class RunConfig:
    backend: str
    numerics: str
    determinism: str
    batch_size: int
    threads: int

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.numerics}-{self.determinism}-b{self.batch_size}-t{self.threads}"

    @classmethod
    def parse(cls, spec: str, default_threads: int) -> RunConfig:
        """``backend:numerics:determinism:batch[:threads]``; '-' or empty takes the backend's default."""
        parts = [p.strip() for p in spec.split(":")]
        if parts[0] not in BACKENDS or not 1 <= len(parts) <= 5:
            raise ValueError(f"bad config {spec!r}: expected backend:numerics:determinism:batch[:threads]")
        parts += [""] * (5 - len(parts))
        backend, num, det, batch, thr = parts
        if backend == "openai":  # numerics slot = which server (--server LABEL=URL); batch = requests in flight
            return cls(backend, num if num not in ("", "-") else SERVER, SERVER, int(batch or 1), default_threads)
        num = num if num not in ("", "-") else {"llama_cpp": "gguf"}.get(backend, "fp32")
        det = det if det not in ("", "-") else ("fast" if backend == "ditto" else "none")
        if backend != "ditto":
            det = "none"
        if backend == "llama_cpp":
            num = "gguf"
        return cls(backend, num, det, int(batch or 1), int(thr or default_threads))

    def numerics_mismatch(self) -> str | None:
        """Why ditto cannot run this numerics mode under this determinism level (config.check_numerics), or None."""
        if self.backend != "ditto":
            return None
        try:
            check_numerics(self.numerics, self.determinism)
        except ValueError as exc:
            return str(exc)
        return None


@dataclass
class Skipped:
    config: dict
    reason: str


def expand_matrix(
    backends: list[str],
    numerics: list[str],
    determinism: list[str],
    batch_sizes: list[int],
    threads: list[int],
    servers: list[str] = (SERVER,),
) -> tuple[list[RunConfig], list[Skipped]]:
    """All valid configs of the cross product (deduplicated, in a stable order) and the skipped ones.

    An openai config's numerics slot names its server (`servers`: labels of --server LABEL=URL, or
    "server" for --base-url): the server, not ditto, decides its numerics and determinism."""
    configs: list[RunConfig] = []
    skipped: list[Skipped] = []

    def skip(cfg: RunConfig, reason: str) -> None:
        if all(s.config != asdict(cfg) for s in skipped):
            skipped.append(Skipped(asdict(cfg), reason))

    for be in backends:
        if be not in BACKENDS:
            raise ValueError(f"unknown backend {be!r}; choose from {', '.join(BACKENDS)}")
        if be == "openai":
            for label in servers:
                for b in batch_sizes:
                    if (cfg := RunConfig(be, label, SERVER, b, threads[0])) not in configs:
                        configs.append(cfg)
            continue
        for num in numerics if be != "llama_cpp" else ["gguf"]:
            for det in determinism if be == "ditto" else ["none"]:
                for b in batch_sizes:
                    for t in threads:
                        cfg = RunConfig(be, num, det, b, t)
                        if mismatch := cfg.numerics_mismatch():
                            skip(cfg, mismatch)
                        elif be == "transformers" and num not in HF_NUMERICS:
                            skip(cfg, f"transformers runs {', '.join(HF_NUMERICS)} only")
                        elif be == "llama_cpp" and b != 1:
                            skip(cfg, "llama_cpp runs one sequence at a time (batch 1 only)")
                        elif cfg not in configs:
                            configs.append(cfg)
    return configs, skipped


@dataclass
class Workload:
    model: str = "smollm2-135m-instruct"
    task: str = "gsm8k"
    data: str | None = None
    limit: int | None = 50
    offset: int = 0
    prompt: str = "chat"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_tokens: int = 256
    arith_digits: str = "1"
    arith_steps: str = "1"
    problems: list = field(default_factory=list, repr=False)  # filled by prepare()
    prompt_ids: list = field(default_factory=list, repr=False)

    def prepare(self) -> Workload:
        from ditto.loader.registry import resolve_model
        from ditto.loader.tokenizer import Tokenizer

        task = get_task(self.task, data=self.data, digits=self.arith_digits, steps=self.arith_steps, seed=self.seed)
        self.problems = task.load(self.limit, self.offset)
        tok = Tokenizer.load(resolve_model(self.model))
        template = PromptTemplate(format=self.prompt)
        renderer = _Renderer(tok)
        chat = self.prompt.startswith("chat") and tok.chat_template is not None
        self.prompt_ids = [
            tok.encode(template.render(p, self.task, renderer), add_special_tokens=not chat) for p in self.problems
        ]
        self._stop = template.stop()
        self._template = template.record(self.task)
        self._tokenizer_digest = getattr(tok, "digest", None)
        return self

    def params(self, problem_id: str, per_problem_seed: bool = True) -> SamplingParams:
        seed = problem_seed(self.seed, problem_id) if per_problem_seed and self.temperature > 0 else self.seed
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed,
            max_tokens=self.max_tokens,
            stop=tuple(self._stop),
        )

    def record(self) -> dict:
        rec = {k: v for k, v in asdict(self).items() if k not in ("problems", "prompt_ids")}
        rec["problem_ids"] = [p.id for p in self.problems]
        rec["prompt_template"] = self._template
        rec["tokenizer_digest"] = self._tokenizer_digest
        rec["prompt_ids_sha256"] = hashlib.sha256(json.dumps(self.prompt_ids).encode()).hexdigest()
        rec["sampling"] = self.params("x", per_problem_seed=False).record()
        rec["seed_rule"] = "greedy: seed unused; sampling: per-problem seed (ditto, llama_cpp), one seed (transformers)"
        rec["hash"] = hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return rec


class _Renderer:
    """The bit of the Backend protocol PromptTemplate.render needs, on ditto's own tokenizer."""

    def __init__(self, tok):
        self.tok = tok

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.tok.chat_template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant:" if add_generation_prompt else "")
        return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def build_backend(cfg: RunConfig, model: str, engine_options: dict | None = None):
    """The Backend for one config (imports each engine only when used)."""
    import torch

    from ditto.loader.registry import resolve_model

    torch.set_num_threads(cfg.threads)
    if cfg.backend == "ditto":
        from ditto import LLM

        opts = {k: v for k, v in (engine_options or {}).items() if k != "openai"}
        opts.update(max_num_seqs=cfg.batch_size, threads=cfg.threads)
        return LLM(model, numerics=cfg.numerics, determinism=cfg.determinism, progress=False, **opts)
    path = resolve_model(model)
    if cfg.backend == "transformers":
        from ditto.backends.transformers import TransformersBackend

        return TransformersBackend(str(path), dtype=HF_NUMERICS[cfg.numerics], batch_size=cfg.batch_size)
    if cfg.backend == "llama_cpp":
        from ditto.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(str(path), threads=cfg.threads)
    if cfg.backend == "openai":  # engine_options["openai"]: base_url, api_key, served_model, timeout_s, servers
        from ditto.backends.openai import OpenAIBackend

        server = dict((engine_options or {}).get("openai") or {})
        urls = {SERVER: server.pop("base_url", None)} | server.pop("servers", {})
        if not urls.get(cfg.numerics):
            raise ValueError(f"config {cfg.name}: no URL for server {cfg.numerics!r} (--server LABEL=URL, --base-url)")
        if cfg.numerics != SERVER:  # a named server answers under its own model id
            server.pop("served_model", None)
        return OpenAIBackend(urls[cfg.numerics], tokenizer=str(path), max_concurrency=cfg.batch_size, **server)
    raise ValueError(f"unknown backend {cfg.backend!r}")


def _strip_stop(token_ids: list[int], stop_reason) -> list[int]:
    """Backends differ on whether the stop token is part of the output (ditto: yes, HF: no): drop it."""
    if isinstance(stop_reason, int) and token_ids and token_ids[-1] == stop_reason:
        return token_ids[:-1]
    return token_ids


def config_dir(out: Path, cfg: RunConfig) -> Path:
    return out / "configs" / cfg.name


def is_complete(out: Path, cfg: RunConfig, workload_hash: str, n: int) -> bool:
    d = config_dir(out, cfg)
    try:
        man = json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not man.get("complete") or man.get("workload_hash") != workload_hash:
        return False
    return len(load_config_results(d)) == n


def load_config_results(d: Path) -> dict[str, dict]:
    path = d / "results.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["id"]] = rec
    return out


def run_config(cfg: RunConfig, workload: Workload, out: Path, engine_options: dict | None = None) -> dict:
    """Generate the workload under `cfg`; writes results.jsonl and manifest.json. Returns the manifest."""
    records, manifest = compute_config(cfg, workload, engine_options)
    write_config(out, cfg, records, manifest)
    return manifest


def compute_config(cfg: RunConfig, workload: Workload, engine_options: dict | None = None) -> tuple[list, dict]:
    """The workload under `cfg`: (one record per prompt, the config's manifest). Writes nothing (a Ray
    worker runs this; the driver writes)."""
    t_load = time.perf_counter()
    backend = build_backend(cfg, workload.model, engine_options)
    load_s = time.perf_counter() - t_load
    try:
        info = backend.info()
        per_problem = cfg.backend != "transformers"  # HF batches only prompts with identical params
        params = [workload.params(p.id, per_problem) for p in workload.problems]
        t0 = time.perf_counter()
        outs = backend.generate([list(ids) for ids in workload.prompt_ids], params)
        gen_s = time.perf_counter() - t0
    finally:
        del backend
        gc.collect()
    records, n_tokens = [], 0
    for prob, ids, ro in zip(workload.problems, workload.prompt_ids, outs):
        comp = ro.outputs[0]
        toks = _strip_stop([int(t) for t in comp.token_ids], comp.stop_reason)
        n_tokens += len(toks)
        grade = grading.grade_response(prob.answer, comp.text)
        records.append(
            {
                "id": prob.id,
                "prompt_tokens": len(ids),
                "token_ids": toks,
                "text": comp.text,
                "answer": grading.answer_key(grade.extracted) if grade.extracted is not None else None,
                "extracted": grade.extracted,
                "gold": prob.answer,
                "correct": bool(grade.correct),
                "finish_reason": comp.finish_reason,
            }
        )
    manifest = {
        "config": asdict(cfg),
        "name": cfg.name,
        "workload_hash": workload.record()["hash"],
        "backend_info": info,
        "load_seconds": load_s,
        "generate_seconds": gen_s,
        "generated_tokens": n_tokens,
        "tokens_per_second": n_tokens / gen_s if gen_s > 0 else None,
        "batching_note": {
            "ditto": f"max_num_seqs={cfg.batch_size}; all prompts submitted at once (continuous batching)",
            "transformers": f"{cfg.batch_size} prompts per generate() call, left padded",
            "llama_cpp": "sequential, one request at a time",
            "openai": f"{cfg.batch_size} requests in flight; the server batches them as it does",
        }[cfg.backend],
        "complete": True,
    }
    return records, manifest


def write_config(out: Path, cfg: RunConfig, records: list[dict], manifest: dict) -> None:
    """results.jsonl (atomically), then the manifest that marks the config complete."""
    d = config_dir(out, cfg)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "results.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / "results.jsonl")
    write_json_atomic(d / "manifest.json", manifest)


CONFIG_ERRORS = (ValueError, NotImplementedError, RuntimeError, ImportError, FileNotFoundError)


def try_config(cfg: RunConfig, workload: Workload, engine_options: dict | None = None) -> tuple[list, dict] | str:
    """compute_config, or the reason the config cannot run here ("TypeName: message")."""
    try:
        return compute_config(cfg, workload, engine_options)
    except CONFIG_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


def run_study(
    workload: Workload,
    configs: list[RunConfig],
    out: str | os.PathLike,
    *,
    skipped: list[Skipped] | None = None,
    engine_options: dict | None = None,
    progress: bool = False,
    reference: str | None = None,
    report: bool = True,
    ray: dict | None = None,
) -> dict:
    """Run every config not yet complete, then write the report. Returns study.json's content + metrics.

    `ray`: {"address": ..., "workers": ...} runs the configs as units over a Ray cluster (one config per
    unit, each on the thread count it names; this process writes their folders as they finish)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not workload.prompt_ids:
        workload.prepare()
    wrec = workload.record()
    study_path = out / "study.json"
    if study_path.exists():
        old = json.loads(study_path.read_text())
        if old.get("workload", {}).get("hash") != wrec["hash"]:
            raise WorkloadMismatch(
                f"{out} holds a study of another workload ({old.get('workload', {}).get('hash')} vs {wrec['hash']}); "
                "use another --out folder"
            )
    skipped = list(skipped or [])
    failed: list[Skipped] = []
    ran, reused = [], []
    n = len(workload.problems)

    def save() -> dict:  # after every config, so a study cut short still has a readable study.json
        done = [c for c in configs if is_complete(out, c, wrec["hash"], n)]
        study = {
            "workload": wrec,
            "configs": [asdict(c) | {"name": c.name} for c in done],
            "skipped": [asdict(s) for s in skipped + failed],
            "pending": [c.name for c in configs if c not in done and all(f.config != asdict(c) for f in failed)],
            "ran": ran,
            "reused": reused,
            "reference": reference,
        } | ({"ray": pool_record} if pool_record else {})
        write_json_atomic(study_path, study)
        return study

    pool_record: dict = {}  # --ray: the pool's record, filled at the end of the job
    bar = _bar(progress, len(configs))
    reused += [c.name for c in configs if is_complete(out, c, wrec["hash"], n)]
    todo = [c for c in configs if c.name not in reused]
    if bar:
        bar[0].advance(bar[1], len(reused))
    try:
        for cfg, result in _results(todo, workload, engine_options, ray, bar, pool_record):
            if isinstance(result, str):
                failed.append(Skipped(asdict(cfg), result))
            else:
                write_config(out, cfg, *result)
                ran.append(cfg.name)
            save()
            if bar:
                bar[0].advance(bar[1])
    finally:
        if bar:
            bar[0].stop()
    study = save()
    done = study["configs"]
    if report and done:
        from ditto.repro.report import write_report

        write_report(out)
    return study


def _results(todo: list[RunConfig], workload: Workload, engine_options, ray: dict | None, bar, pool_record: dict):
    """(config, try_config's answer) for every config in `todo`: one after the other here, or over Ray
    in the order they finish."""
    if ray is None:
        for cfg in todo:
            if bar:
                bar[0].update(bar[1], description=cfg.name)
            yield cfg, try_config(cfg, workload, engine_options)
        return
    if not todo:
        return
    from functools import partial

    from ditto.ray_pool import WorkerPool, no_engine

    by_name = {c.name: c for c in todo}
    threads = max(c.threads for c in todo)  # each worker reserves the most any config runs on
    with WorkerPool(no_engine, threads=threads, max_workers=len(todo), **ray) as pool:
        if bar:
            bar[0].update(bar[1], description=f"{len(pool.actors)} ray workers")
        units = [(c.name, c) for c in todo]
        for name, result in pool.map(partial(_config_unit, workload, engine_options), units):
            yield by_name[name], result
        pool_record.update(pool.record())


def _config_unit(workload: Workload, engine_options: dict | None, _engine, cfg: RunConfig):
    return try_config(cfg, workload, engine_options)


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(
        TextColumn("repro"), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    p.start()
    return p, p.add_task("", total=total)


def load_study(out: str | os.PathLike) -> tuple[dict, dict[str, dict[str, dict]], dict[str, dict]]:
    """(study.json, {config: {prompt_id: record}}, {config: manifest}) of a study folder."""
    out = Path(out)
    study = json.loads((out / "study.json").read_text())
    results, manifests = {}, {}
    for c in study["configs"]:
        d = out / "configs" / c["name"]
        results[c["name"]] = load_config_results(d)
        manifests[c["name"]] = json.loads((d / "manifest.json").read_text())
    return study, results, manifests
