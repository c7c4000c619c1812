"""Accuracy-vs-compute table of the strategy matrix that `benchmarks/strategy_runs.sh` computes.

For each task it runs `ditto eval compare` twice over the finished runs:
- per budget B, every run capped at B (and greedy) paired with self-consistency at B (equal cap);
- once over all runs with --pair-by tokens: each run paired with the self-consistency run nearest in the
  tokens it actually generated (self-consistency at 1-2 samples gives that curve its low end).
Then prints one markdown table per task: a row per strategy variant, the budgets side by side. Unfinished
runs (no summary.json) are left out and listed.

  python benchmarks/strategy_table.py                       # runs/strategies-smollm2, arith and gsm8k
  python benchmarks/strategy_table.py --runs DIR --tasks arith --out runs/strategy-table.md
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ditto.eval.report_compare import BASELINE_STRATEGIES, compare_strategies

BASELINE = BASELINE_STRATEGIES[0]  # self_consistency: what strategy_runs.sh runs as majority voting


def _budget(run: Path) -> int | None:
    """The budget in a run folder's name (`...-b768`), None for runs without one (greedy)."""
    m = re.search(r"-b(\d+)$", run.name)
    return int(m.group(1)) if m else None


def _runs(root: Path, task: str) -> tuple[dict[int | None, list[Path]], list[Path]]:
    """Finished runs of `task` by budget (None: no budget), and the unfinished ones."""
    by_budget: dict[int | None, list[Path]] = {}
    unfinished = []
    for d in sorted(p for p in root.glob(f"{task}-*") if p.is_dir()):
        if not (d / "summary.json").exists():
            unfinished.append(d)
            continue
        by_budget.setdefault(_budget(d), []).append(d)
    return by_budget, unfinished


def _short(label: str) -> str:
    return label.replace(BASELINE, "voting")


def _cell(row: dict) -> list[str]:
    lo, hi = row["ci95"]
    acc = f"{100 * row['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    tok = f"{row['mean_cost']['generated_tokens']:.0f}"
    if "diff" not in row:
        return [acc, tok, "baseline"]
    return [acc, tok, f"{100 * row['diff']:+.1f}, p={row['mcnemar_p']:.2g}"]


def task_table(root: Path, task: str, out_root: Path) -> str:
    by_budget, unfinished = _runs(root, task)
    flat = by_budget.get(None, [])
    every = [d for ds in by_budget.values() for d in ds]
    started = {_budget(d) for d in [*unfinished, *every] if BASELINE not in d.name}
    main = sorted(
        b for b in by_budget if b is not None and b in started
    )  # budgets the other strategies use, not only voting
    curve = sorted(b for b in by_budget if b is not None and b not in main)
    # the token-paired compare sees every finished run, so its variant names are the task's: a per-budget
    # compare names variants among its own runs only (a lone chunk_guided there would lose its [mode=...])
    _, tok_numbers = compare_strategies(every, pair_by="tokens", out=out_root / f"cmp-{task}-tokens")
    near = {r["run"]: r for r in tok_numbers["runs"]}
    cells: dict[str, dict[int, tuple[list[str], str]]] = {}  # variant -> budget -> (cells, run folder)
    order: list[str] = []
    for b in main:
        base = next((d for d in by_budget[b] if d.name.startswith(f"{task}-{BASELINE}-")), None)
        if base is None:
            continue
        _, numbers = compare_strategies([*flat, *by_budget[b]], baseline=base, out=out_root / f"cmp-{task}-b{b}")
        for row in numbers["runs"]:
            key = near[row["run"]]["variant"]
            if key not in order:
                order.append(key)
            cells.setdefault(key, {})[b] = (_cell(row), row["run"])

    head = ["strategy"]
    for b in main:
        head += [f"@{b}: acc % [95% CI]", "gen tok", f"vs voting@{b}", "vs voting at ~ tokens"]
    lines = [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in order:
        row = [key]
        for b in main:
            if b not in cells[key]:
                row += ["-", "-", "-", "-"]
                continue
            c, run = cells[key][b]
            r = near[run]
            tok = (
                "baseline"
                if "diff" not in r
                else f"{100 * r['diff']:+.1f} vs {_short(r['baseline'])}, p={r['mcnemar_p']:.2g}"
            )
            row += [*c, tok]
        lines.append("| " + " | ".join(row) + " |")
    for b in curve:
        for d in by_budget[b]:
            r = next(x for x in tok_numbers["runs"] if x["run"] == str(d))
            lines.append(f"\nvoting curve: {r['label']} {_cell(r)[0]} at {_cell(r)[1]} tokens")
    if flat and main:
        lines.append("\n(runs without a budget, such as greedy, are repeated under each budget)")
    if unfinished:
        lines.append("\nnot finished: " + ", ".join(d.name for d in unfinished))
    lines.append(f"\nplots: {out_root}/cmp-{task}-b*/compare.png, {out_root}/cmp-{task}-tokens/compare.png")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/strategies-smollm2", help="folder strategy_runs.sh wrote")
    ap.add_argument("--tasks", nargs="+", default=["arith", "gsm8k"])
    ap.add_argument("--cmp", default="runs", help="where the compare folders go")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()
    text = "\n\n".join(task_table(Path(args.runs), t, Path(args.cmp)) for t in args.tasks)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
