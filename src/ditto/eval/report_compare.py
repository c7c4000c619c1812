"""Run comparisons: two runs paired on their shared problems, and accuracy vs cost over several strategy runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ditto.eval.metrics import compare_runs, summarize, wilson_interval
from ditto.eval.report_plots import _cost_plot
from ditto.eval.report_render import _COST_KEYS, _fmt, _load


def compare(run_a: str | Path, run_b: str | Path, *, seed: int = 0) -> tuple[str, dict]:
    """Compare two run folders on their shared problems: (markdown table, numbers)."""
    ra, rb = Path(run_a), Path(run_b)
    (ma, a), (mb, b) = _load(ra), _load(rb)
    ca = {r["id"]: [bool(s["correct"]) for s in r["samples"]] for r in a}
    cb = {r["id"]: [bool(s["correct"]) for s in r["samples"]] for r in b}
    cmp = compare_runs(ca, cb, seed=seed)
    sa, sb = summarize([r for r in a if r["id"] in cb]), summarize([r for r in b if r["id"] in ca])

    def row(name, fa, fb):
        return f"| {name} | {fa} | {fb} |"

    ia, ib = (
        wilson_interval(cmp.both + cmp.only_a, cmp.n_problems),
        wilson_interval(cmp.both + cmp.only_b, cmp.n_problems),
    )
    lo, hi = cmp.bootstrap["ci95"]
    lines = [
        f"# compare\n\nA = `{ra}` ({ma.get('backend', {}).get('model')})  \n"
        f"B = `{rb}` ({mb.get('backend', {}).get('model')})",
        "",
        "| | A | B |",
        "|---|---|---|",
        row("shared problems", cmp.n_problems, cmp.n_problems),
        row("accuracy (mean per-problem solve rate)", _fmt(cmp.acc_a), _fmt(cmp.acc_b)),
        row(
            "first-sample accuracy [95% Wilson]",
            f"{_fmt((cmp.both + cmp.only_a) / cmp.n_problems)} [{_fmt(ia[0])}, {_fmt(ia[1])}]",
            f"{_fmt((cmp.both + cmp.only_b) / cmp.n_problems)} [{_fmt(ib[0])}, {_fmt(ib[1])}]",
        ),
        row("pass@1", _fmt(sa["pass_at_k"][1]), _fmt(sb["pass_at_k"][1])),
        row("mean tokens per sample", f"{sa['mean_tokens_per_sample']:.1f}", f"{sb['mean_tokens_per_sample']:.1f}"),
        row(
            "mean seconds per problem", f"{sa['mean_seconds_per_problem']:.3f}", f"{sb['mean_seconds_per_problem']:.3f}"
        ),
        "",
        f"First samples: both right {cmp.both}, only A {cmp.only_a}, only B {cmp.only_b}, neither {cmp.neither}; "
        f"McNemar exact p = {cmp.mcnemar_p:.4g}.",
        f"Paired bootstrap (B - A) = {100 * cmp.bootstrap['diff']:+.1f} points, 95% CI "
        f"[{100 * lo:+.1f}, {100 * hi:+.1f}], p = {cmp.bootstrap['p_value']:.4g}.",
        "",
        f"**Verdict: {cmp.verdict()}** (basis: {cmp.basis}).",
    ]
    numbers = {
        "n_problems": cmp.n_problems,
        "acc_a": cmp.acc_a,
        "acc_b": cmp.acc_b,
        "both": cmp.both,
        "only_a": cmp.only_a,
        "only_b": cmp.only_b,
        "neither": cmp.neither,
        "mcnemar_p": cmp.mcnemar_p,
        "bootstrap": cmp.bootstrap,
        "significant": cmp.significant,
        "verdict": cmp.verdict(),
    }
    return "\n".join(lines), numbers


# ----------------------------------------------------------------------------------------------
# strategy runs: accuracy vs cost over several folders
# ----------------------------------------------------------------------------------------------

BASELINE_STRATEGIES = ("self_consistency", "majority")


def is_strategy_run(run: str | Path) -> bool:
    m = Path(run) / "manifest.json"
    return m.exists() and bool(json.loads(m.read_text()).get("strategy"))


def _run_label(manifest: dict, run: Path) -> tuple[str, str, int | None]:
    st = manifest.get("strategy") or {}
    if not st:
        cfg = manifest.get("config", {})
        name = f"sample(n={cfg.get('n')}, T={cfg.get('temperature')})"
        return name, name, None
    budget = (st.get("budget") or {}).get("max_generated_tokens")
    return st.get("name"), _at_budget(st.get("name"), budget), budget


def _at_budget(name: str, budget: int | None) -> str:
    return name if budget is None else f"{name}@{budget}"


def _variants(loaded: list[dict]) -> None:
    """Name each run's variant: its strategy plus the knobs that tell it apart from same-named runs.

    best_of_n with scorer=self and scorer=second become `best_of_n[scorer=self]` and `best_of_n[scorer=second]`;
    self-consistency at several budgets stays one variant, so the plot draws it as one curve: the sample
    count n is the cost axis, not a variant, and is left out.
    """
    by_name: dict[str, list[dict]] = {}
    for x in loaded:
        by_name.setdefault(x["strategy"], []).append(x)
    for xs in by_name.values():
        args = [(x["manifest"].get("strategy") or {}).get("args") or {} for x in xs]
        keys = sorted({k for a in args for k in a if k != "n" and len({json.dumps(b.get(k)) for b in args}) > 1})
        for x, a in zip(xs, args):
            knobs = ",".join(f"{k}={a[k]}" for k in keys if k in a)
            x["variant"] = f"{x['strategy']}[{knobs}]" if knobs else x["strategy"]
            x["label"] = _at_budget(x["variant"], x["budget"])


def compare_strategies(
    runs: list[str | Path],
    *,
    baseline: str | Path | None = None,
    pair_by: str = "budget",
    out: str | Path | None = None,
    seed: int = 0,
) -> tuple[str, dict]:
    """Accuracy [95% Wilson] vs mean cost of several runs on their shared problems, each paired against a baseline.

    The baseline of a run is `baseline` when given, else a self-consistency run: with pair_by="budget" the one
    whose token budget (cap) is closest to the run's own; with pair_by="tokens" the one whose mean generated
    tokens per problem are closest on a log scale (what the run actually spent, which matters for strategies
    that stop below their cap). Without self-consistency runs, the first folder. Writes compare.md,
    compare.json and compare.png into `out` (default: the first folder). Returns (markdown, numbers).
    """
    if pair_by not in ("budget", "tokens"):
        raise ValueError(f"pair_by must be 'budget' or 'tokens', not {pair_by!r}")
    paths = [Path(r) for r in runs]
    loaded = []
    for p in paths:
        manifest, records = _load(p)
        if not records:
            raise ValueError(f"{p} has no results")
        strategy, label, budget = _run_label(manifest, p)
        loaded.append({"path": p, "manifest": manifest, "records": records, "strategy": strategy, "budget": budget})
        loaded[-1]["label"] = loaded[-1]["variant"] = label
    _variants([x for x in loaded if x["manifest"].get("strategy")])
    labels = [x["label"] for x in loaded]
    for x in loaded:
        if labels.count(x["label"]) > 1:
            x["label"] = f"{x['label']} ({x['path'].name})"
    shared = set.intersection(*({r["id"] for r in x["records"]} for x in loaded))
    if not shared:
        raise ValueError("the runs share no problems")
    ids = sorted(shared)
    for x in loaded:
        by_id = {r["id"]: r for r in x["records"]}
        recs = [by_id[i] for i in ids]
        x["correct"] = {r["id"]: [bool(s["correct"]) for s in r["samples"]] for r in recs}
        n_ok = sum(v[0] for v in x["correct"].values())
        x["accuracy"] = n_ok / len(ids)
        x["ci95"] = wilson_interval(n_ok, len(ids))
        if any("cost" in r for r in recs):
            cost = {k: sum(r.get("cost", {}).get(k, 0) for r in recs) for k in _COST_KEYS}
        else:  # a plain sampling run: tokens of all its samples, one call per problem
            cost = dict.fromkeys(_COST_KEYS, 0)
            cost["generated_tokens"] = sum(s["n_tokens"] for r in recs for s in r["samples"])
            cost["model_calls"] = len(recs)
            cost["wall_time_s"] = sum(r.get("seconds", 0.0) for r in recs)
        x["total_cost"] = cost
        x["mean_cost"] = {k: v / len(ids) for k, v in cost.items()}

    def pick_baseline(x):
        if baseline is not None:
            for y in loaded:
                if str(y["path"]) == str(baseline) or y["path"].resolve() == Path(baseline).resolve():
                    return y
                if y["label"] == str(baseline):
                    return y
            raise ValueError(f"baseline {baseline} is not one of the compared runs")
        cands = [y for y in loaded if y["strategy"] in BASELINE_STRATEGIES]
        if not cands:
            return loaded[0]
        if pair_by == "tokens":
            spent = max(1e-9, x["mean_cost"]["generated_tokens"])
            return min(cands, key=lambda y: abs(math.log(max(1e-9, y["mean_cost"]["generated_tokens"]) / spent)))
        if x["budget"] is None:
            return cands[0]
        return min(cands, key=lambda y: abs((y["budget"] or 0) - x["budget"]))

    if baseline is not None:
        pairing = f"{baseline}, as asked"
    elif pair_by == "tokens":
        pairing = "the self-consistency run closest in mean generated tokens"
    else:
        pairing = "the self-consistency run at the closest budget"
    lines = [
        "# compare: accuracy vs cost",
        "",
        f"{len(ids)} shared problems; accuracy with 95% Wilson interval; costs are means per problem "
        "(tokens generated / scored by every model, backend calls, wall seconds). Each run is paired with its "
        f"baseline ({pairing}): McNemar exact p and the paired-bootstrap difference (run - baseline) with its "
        "95% CI.",
        "",
        "| run | budget | accuracy [95% CI] | gen tokens | scored tokens | calls | seconds | total gen tokens "
        "| baseline | diff [95% CI] | McNemar p | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for x in loaded:
        base = pick_baseline(x)
        row = {
            "run": str(x["path"]),
            "label": x["label"],
            "strategy": x["strategy"],
            "variant": x["variant"],
            "budget": x["budget"],
            "problems": len(ids),
            "accuracy": x["accuracy"],
            "ci95": list(x["ci95"]),
            "mean_cost": x["mean_cost"],
            "total_cost": x["total_cost"],
            "baseline": base["label"],
        }
        mc = x["mean_cost"]
        cells = [
            x["label"],
            str(x["budget"] if x["budget"] is not None else "-"),
            f"{_fmt(x['accuracy'])} [{_fmt(x['ci95'][0])}, {_fmt(x['ci95'][1])}]",
            f"{mc['generated_tokens']:.1f}",
            f"{mc['scored_tokens']:.1f}",
            f"{mc['model_calls']:.1f}",
            f"{mc['wall_time_s']:.2f}",
            f"{x['total_cost']['generated_tokens']}",
        ]
        if base is x:
            cells += ["(baseline)", "-", "-", "-"]
        else:
            cmp = compare_runs(base["correct"], x["correct"], seed=seed)
            lo, hi = cmp.bootstrap["ci95"]
            diff = cmp.acc_b - cmp.acc_a
            row |= {"diff": diff, "diff_ci95": [lo, hi], "mcnemar_p": cmp.mcnemar_p, "significant": cmp.significant}
            verdict = ("better" if diff > 0 else "worse") if cmp.significant else "n.s."
            cells += [
                base["label"],
                f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
                f"{cmp.mcnemar_p:.3g}",
                verdict,
            ]
        rows.append(row)
        lines.append("| " + " | ".join(cells) + " |")
    out_dir = Path(out) if out else paths[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _cost_plot(loaded, out_dir / "compare.png", BASELINE_STRATEGIES)
    lines += ["", f"![accuracy vs cost]({png.name})", ""]
    text = "\n".join(lines)
    (out_dir / "compare.md").write_text(text, encoding="utf-8")
    numbers = {"problems": len(ids), "runs": rows, "markdown": str(out_dir / "compare.md"), "plot": str(png)}
    (out_dir / "compare.json").write_text(json.dumps(numbers, indent=2, default=str), encoding="utf-8")
    return text, numbers
