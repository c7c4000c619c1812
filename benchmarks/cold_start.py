"""Cold start: a fresh process each, ditto against llama.cpp on the same GGUF file, side by side in one run.

    .venv/bin/python benchmarks/cold_start.py [--reps 3] [--threads N] [--max-tokens 16] [--no-serve]

Measured for a 16-token greedy chat answer to "What is 17 * 23?" (each a new process, runs interleaved,
median and best of --reps):

- `ditto generate` (the CLI, as a user runs it) under the default (`fast`), `--determinism batch_invariant`,
  `--determinism exact` and `--numerics gguf` (the file's own blocks, batch invariant): total wall time to
  exit, time to the first byte of the answer on stdout, peak RSS (the child's ru_maxrss from wait4);
- the Python API in a child process (same four configurations, and llama-cpp-python): import, `LLM()` /
  `Llama()` construction, time from launch to the first token, to the answer, peak RSS;
- `ditto serve`: time from launch until GET /health answers 200, and its peak RSS by then.

llama-cpp-python (built by `make peers`) runs the bundled Q4_1 file with n_ctx 8192, the same thread
count, its own chat template handling. Every configuration runs once before the timed rounds (kernel
builds, digests and the page cache are warm: a cached run, as the second run of a user). Numbers move
with the machine's load: compare the ratios of one run. Results: benchmarks/results/cold_start/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DITTO = [str(Path(PY).parent / "ditto")] if (Path(PY).parent / "ditto").exists() else [PY, "-m", "ditto.cli"]
PROMPT = "What is 17 * 23?"
LEVELS = {
    "default": [],
    "batch_invariant": ["--determinism", "batch_invariant"],
    "exact": ["--determinism", "exact"],
    "gguf": ["--numerics", "gguf", "--determinism", "batch_invariant"],  # the file's own blocks
}

API_CHILD = r"""
import json, os, resource, sys, time
launch = float(os.environ["COLD_LAUNCH"])
t0 = time.time()
from ditto import LLM, SamplingParams
t1 = time.time()
llm = LLM(sys.argv[1], determinism=sys.argv[2], numerics=sys.argv[3], threads=int(sys.argv[4]), progress=False)
t2 = time.time()
ids = llm.encode(llm.chat_prompt([{"role": "user", "content": sys.argv[5]}]), add_special_tokens=False)
first, n, text = None, 0, ""
for _, delta, new in llm.stream(ids, SamplingParams(temperature=0, max_tokens=int(sys.argv[6]))):
    first = first or time.time()
    n, text = n + len(new), text + delta
t3 = time.time()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"start_s": t0 - launch, "import_s": t1 - t0, "init_s": t2 - t1, "first_token_s": first - launch,
                  "answer_s": t3 - launch, "tokens": n, "text": text, "peak_rss_mb": rss}))
"""

LLAMA_CHILD = r"""
import json, os, resource, sys, time
launch = float(os.environ["COLD_LAUNCH"])
t0 = time.time()
from llama_cpp import Llama
t1 = time.time()
threads = int(sys.argv[2])
llm = Llama(sys.argv[1], n_ctx=8192, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
t2 = time.time()
first, n, text = None, 0, ""
msgs = [{"role": "user", "content": sys.argv[3]}]
for chunk in llm.create_chat_completion(msgs, max_tokens=int(sys.argv[4]), temperature=0.0, stream=True):
    delta = chunk["choices"][0]["delta"].get("content")
    if delta:
        first = first or time.time()
        n, text = n + 1, text + delta
t3 = time.time()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"start_s": t0 - launch, "import_s": t1 - t0, "init_s": t2 - t1, "first_token_s": first - launch,
                  "answer_s": t3 - launch, "tokens": n, "text": text, "peak_rss_mb": rss}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, COLD_LAUNCH=repr(time.time()), PYTHONPATH=str(ROOT / "src"))
    env.pop("DITTO_TILED_INVARIANT", None)
    return env


def _wait(proc: subprocess.Popen) -> float:
    """Reap the child; its peak RSS in MB (ru_maxrss of that child alone)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024


def run_cli(args, level: str) -> dict:
    cmd = [*DITTO, "generate", "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
    cmd += [*LEVELS[level], "--temperature", "0", PROMPT]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    first_byte = proc.stdout.read(1)
    first = time.perf_counter() - t0
    rest = proc.stdout.read()
    err = proc.stderr.read()
    rss = _wait(proc)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ditto generate ({level}) failed: {err.decode()[-2000:]}")
    text = (first_byte + rest).decode(errors="replace").strip()
    return {"total_s": total, "first_token_s": first, "peak_rss_mb": rss, "text": text}


def run_child(code: str, argv: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    out, err = proc.communicate()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {err.decode()[-2000:]}")
    rec = json.loads(out.decode().strip().splitlines()[-1])
    rec["total_s"] = total
    return rec


def run_serve(args, port: int) -> dict:
    cmd = [*DITTO, "serve", "--port", str(port), "--threads", str(args.threads), "--log-level", "error"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    ready = None
    try:
        while ready is None and time.perf_counter() - t0 < 300:
            if proc.poll() is not None:
                raise RuntimeError(f"ditto serve exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        ready = time.perf_counter() - t0
            except OSError:
                time.sleep(0.02)
    finally:
        proc.terminate()
        rss = _wait(proc)
    if ready is None:
        raise RuntimeError("ditto serve did not answer /health within 300 s")
    return {"ready_s": ready, "peak_rss_mb": rss}


def _llama_available() -> bool:
    return subprocess.run([PY, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cold_start" / "cold_start.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ditto.loader.registry import resolve_model

    gguf = str(resolve_model(args.model))
    numerics = {"default": "fp32", "batch_invariant": "fp32", "exact": "integer", "gguf": "gguf"}
    det = {"default": "fast", "batch_invariant": "batch_invariant", "exact": "exact", "gguf": "batch_invariant"}
    jobs: dict[str, Callable[[], dict]] = {}
    for level in LEVELS:
        jobs[f"ditto generate ({level})"] = lambda lv=level: run_cli(args, lv)
        api = [gguf, det[level], numerics[level], str(args.threads), PROMPT, str(args.max_tokens)]
        jobs[f"ditto LLM() API ({level})"] = lambda a=api: run_child(API_CHILD, a)
    if _llama_available():
        jobs["llama.cpp (llama-cpp-python)"] = lambda: run_child(
            LLAMA_CHILD, [gguf, str(args.threads), PROMPT, str(args.max_tokens)]
        )
    else:
        print("llama-cpp-python is not installed (make peers): no llama.cpp rows", file=sys.stderr)
    if not args.no_serve:
        jobs["ditto serve (to /health)"] = lambda: run_serve(args, 18000 + os.getpid() % 1000)
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    for name, job in jobs.items():  # warm-up: kernel builds, digests, page cache
        print(f"warm-up: {name}", file=sys.stderr)
        job()
    for rep in range(args.reps):
        for name, job in jobs.items():  # interleaved: load changes hit every engine alike
            runs[name].append(job())
            print(f"rep {rep + 1}/{args.reps} {name}: {_brief(runs[name][-1])}", file=sys.stderr)
    summary = {name: _reduce(rs, statistics.median) for name, rs in runs.items()}
    best = {name: _reduce(rs, min) for name, rs in runs.items()}
    print(f"median of {args.reps} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):\n")
    print(render(summary))
    print(f"\nbest of {args.reps} (the least disturbed run of each, on a shared machine):\n")
    print(render(best))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": gguf,
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "reps": args.reps,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "median": summary,
        "best": best,
        "runs": {k: [{f: v for f, v in r.items() if f != "text"} for r in rs] for k, rs in runs.items()},
        "answers": {k: rs[0].get("text") for k, rs in runs.items() if rs and "text" in rs[0]},
    }
    args.out.write_text(json.dumps(record, indent=1))
    shown = args.out.resolve()
    print(f"\nwritten to {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown}", file=sys.stderr)
    return 0


def _brief(rec: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in rec.items() if isinstance(v, float))


def _reduce(recs: list[dict], how: Callable) -> dict:
    keys = [k for k, v in recs[0].items() if isinstance(v, (int, float))]
    return {k: how(r[k] for r in recs) for k in keys}


def render(summary: dict) -> str:
    ref = summary.get("llama.cpp (llama-cpp-python)", {})

    def cell(row: dict, key: str) -> str:
        v = row.get(key)
        if v is None:
            return ""
        ratio = f" ({v / ref[key]:.2f}x)" if ref.get(key) else ""
        return f"{v:.2f}{ratio}" if key != "peak_rss_mb" else f"{v:.0f}{ratio}"

    lines = [
        "| run (fresh process) | total s | construction s | first token s | serve ready s | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        serve = f"{row['ready_s']:.2f}" if "ready_s" in row else ""
        lines.append(
            f"| {name} | {cell(row, 'total_s')} | {cell(row, 'init_s')} | {cell(row, 'first_token_s')} | {serve} "
            f"| {cell(row, 'peak_rss_mb')} |"
        )
    lines.append("\n(x): ratio to llama.cpp; first token and total from process launch; construction = LLM() / Llama()")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
