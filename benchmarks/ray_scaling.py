"""`ditto eval` throughput with Ray at 1 and 2 workers against one process, side by side in one run.

    .venv/bin/python benchmarks/ray_scaling.py [--limit 32] [--max-tokens 128] [--determinism batch_invariant]
        [--out benchmarks/results/ray_scaling]

Runs, each a fresh `ditto eval` process on the same GSM8K problems (greedy, bundled SmolLM2), end to end
(start-up, model load, Ray start, generation, grading):
  local-t1     one process, one torch thread (what each Ray worker runs)
  local-t2     one process, two threads
  ray-w1       --ray --ray-workers 1 (a local cluster started by the command)
  ray-w2       --ray --ray-workers 2
and checks that every run's results.jsonl holds the same tokens (batch_invariant: one thread's bits).
From the Ray runs it derives the per-unit cost (a unit = --batch-problems problems on one worker) and the
fixed cost (Ray start + worker engine loads), and extrapolates to N machines of this size:
    T(N) ~= fixed + ceil(units / (N * workers_per_machine)) * unit_cost
which holds while the driver (grading, writing the folder) keeps up; the table says where it stops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DITTO = str(ROOT / ".venv" / "bin" / "ditto")

RUNS = {
    "local-t1": ["--threads", "1"],
    "local-t2": ["--threads", "2"],
    "ray-w1": ["--ray", "--ray-workers", "1"],
    "ray-w2": ["--ray", "--ray-workers", "2"],
}


def run(name: str, flags: list[str], args, out: Path) -> dict:
    folder = out / name
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    cmd = [DITTO, "eval", "--task", "gsm8k", "--limit", str(args.limit), "--max-tokens", str(args.max_tokens)]
    cmd += ["--temperature", "0", "--determinism", args.determinism, "--batch-problems", str(args.batch_problems)]
    cmd += ["--keep-tokens", "--no-progress", "--json", "--out", str(folder), *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    tokens = sum(s["n_tokens"] for r in rows for s in r["samples"])
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"[ray_scaling] {name}: {wall:.1f} s, {tokens} tokens, {tokens / wall:.1f} tok/s", flush=True)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "problems": len(rows),
        "ids": {r["id"]: [(s.get("token_ids"), s.get("logprobs")) for s in r["samples"]] for r in rows},
        "ray": manifest["sessions"][-1].get("ray"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-problems", type=int, default=4, help="problems per unit")
    ap.add_argument("--determinism", default="batch_invariant")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_scaling"))
    args = ap.parse_args()
    os.environ.setdefault("DITTO_DATA", str(ROOT.parent / "shared" / "data"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/ditto-ray-scaling")
    load0 = os.getloadavg()[0]
    res = {name: run(name, RUNS[name], args, work) for name in args.runs.split(",")}
    ids = {name: r.pop("ids") for name, r in res.items()}
    first = next(iter(ids.values()))
    identical = {name: v == first for name, v in ids.items()}
    units = math.ceil(args.limit / args.batch_problems)
    # two Ray runs give the unit cost and the fixed cost: T(w) = fixed + ceil(units / w) * unit
    model = None
    if {"ray-w1", "ray-w2"} <= res.keys() and res["ray-w1"]["wall_s"] > res["ray-w2"]["wall_s"]:
        t1, t2 = res["ray-w1"]["wall_s"], res["ray-w2"]["wall_s"]
        r1, r2 = units, math.ceil(units / 2)
        unit = (t1 - t2) / (r1 - r2)
        fixed = t1 - r1 * unit
        workers = 2  # per machine of this size (2 cores, one thread each)
        model = {
            "unit_s": unit,
            "fixed_s": fixed,
            "units": units,
            "extrapolated": {str(n): fixed + math.ceil(units / (n * workers)) * unit for n in (1, 2, 4, 8, 16)},
            "per_1000_problems": {
                str(n): fixed + math.ceil(1000 / args.batch_problems / (n * workers)) * unit for n in (1, 4, 16, 64)
            },
        }
    doc = {
        "args": vars(args),
        "load_before": load0,
        "load_after": os.getloadavg()[0],
        "runs": res,
        "identical_to_first": identical,
        "model": model,
    }
    (out / "ray_scaling.json").write_text(json.dumps(doc, indent=1))
    lines = [f"{'run':10} {'wall s':>8} {'tok/s':>8} {'vs local-t2':>11}  same tokens"]
    base = res.get("local-t2", {}).get("tok_s")
    for name, r in res.items():
        rel = f"{r['tok_s'] / base:.2f}x" if base else "-"
        lines.append(f"{name:10} {r['wall_s']:8.1f} {r['tok_s']:8.1f} {rel:>11}  {identical[name]}")
    if model:
        lines.append(
            f"unit ({args.batch_problems} problems x {args.max_tokens} tokens) {model['unit_s']:.1f} s; "
            f"fixed (ray start + engine loads) {model['fixed_s']:.1f} s"
        )
        lines.append(
            "1000 problems on N machines like this one (2 workers each): "
            + ", ".join(f"N={n}: {t / 60:.1f} min" for n, t in model["per_1000_problems"].items())
        )
    lines.append(f"load {load0:.2f} -> {doc['load_after']:.2f}")
    text = "\n".join(lines)
    (out / "ray_scaling.txt").write_text(text + "\n")
    print(text)
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
