"""Reports: report.md and report.html (with matplotlib plots) for a run folder, and run comparisons."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ditto.eval.metrics import compare_runs, summarize, wilson_interval


def _load(run: Path) -> tuple[dict, list[dict]]:
    from ditto.eval.runner import load_results

    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    return manifest, load_results(run / "results.jsonl")


def _plots(records: list[dict], summary: dict, out: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(exist_ok=True)
    made = []

    ks = sorted(int(k) for k in summary["pass_at_k"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [summary["pass_at_k"][k] for k in ks], "o-", label="pass@k")
    ax.plot(ks, [summary["maj_at_k"][k] for k in ks], "s--", label="maj@k")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Accuracy vs k")
    fig.tight_layout()
    p = out / "accuracy_vs_k.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    made.append(("Accuracy vs k", p))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ok = [s["n_tokens"] for r in records for s in r["samples"] if s["correct"]]
    bad = [s["n_tokens"] for r in records for s in r["samples"] if not s["correct"]]
    ax.hist([ok, bad], bins=30, stacked=True, label=["correct", "wrong"], color=["tab:green", "tab:red"])
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title("Response length")
    fig.tight_layout()
    p = out / "length_hist.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    made.append(("Response length", p))

    diffs = summary["by_difficulty"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(diffs)
    accs = [diffs[d]["accuracy"] for d in names]
    ax.bar(range(len(names)), accs, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0)
    for i, d in enumerate(names):
        ax.text(i, accs[i] + 0.01, f"n={diffs[d]['problems']}", ha="center", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("difficulty")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy by difficulty")
    fig.tight_layout()
    p = out / "by_difficulty.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    made.append(("Accuracy by difficulty", p))

    rates = [r["n_correct"] / max(1, len(r["samples"])) for r in records]
    n = summary["samples_per_problem"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = [(i - 0.5) / n for i in range(n + 2)] if n <= 64 else 20
    ax.hist(rates, bins=bins, color="tab:purple", edgecolor="white")
    ax.set_xlabel(f"per-problem solve rate (over {n} samples)")
    ax.set_ylabel("problems")
    ax.set_title("Distribution of per-problem solve rates")
    fig.tight_layout()
    p = out / "solve_rates.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    made.append(("Per-problem solve rates", p))
    return made


_COST_KEYS = ("generated_tokens", "scored_tokens", "model_calls", "scorer_calls", "sandbox_runs", "wall_time_s")


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_markdown(
    manifest: dict, summary: dict, plots: list[tuple[str, Path]], records: list[dict], base: Path
) -> str:
    b = manifest.get("backend", {})
    cfg = manifest.get("config", {})
    grader = manifest.get("grader", {})
    lo, hi = summary["accuracy_ci95"]
    lines = [
        f"# ditto eval: {summary.get('task', cfg.get('task'))}",
        "",
        f"- model: `{b.get('model')}` ({b.get('model_digest')})",
        f"- backend: {b.get('backend')}; numerics: {json.dumps(b.get('numerics'))}; "
        f"determinism: {b.get('determinism')}",
        f"- sampling: n={cfg.get('n')} temperature={cfg.get('temperature')} top_p={cfg.get('top_p')} "
        f"seed={cfg.get('seed')} max_tokens={cfg.get('max_tokens')}; prompt: {cfg.get('prompt')}"
        f"{' (thousands separators)' if cfg.get('thousands') else ''}",
        f"- grader: {grader.get('version')} (math-verify {grader.get('math_verify')})",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        f"| problems | {summary['problems']} |",
        f"| samples per problem | {summary['samples_per_problem']} |",
        f"| accuracy (all samples) | {_fmt(summary['accuracy'])} [{_fmt(lo)}, {_fmt(hi)}] (95% Wilson) |",
        f"| first-sample accuracy | {_fmt(summary['first_sample_accuracy'])} "
        f"[{_fmt(summary['first_sample_accuracy_ci95'][0])}, {_fmt(summary['first_sample_accuracy_ci95'][1])}] |",
    ]
    for k in sorted(int(k) for k in summary["pass_at_k"]):
        lines.append(f"| pass@{k} / maj@{k} | {_fmt(summary['pass_at_k'][k])} / {_fmt(summary['maj_at_k'][k])} |")
    sr = summary["solve_rate"]
    lines += [
        f"| problems never / sometimes / always solved | {_fmt(sr['never'])} / {_fmt(sr['sometimes'])} / "
        f"{_fmt(sr['always'])} |",
        f"| mean tokens per sample / per problem | {summary['mean_tokens_per_sample']:.1f} / "
        f"{summary['mean_tokens_per_problem']:.1f} |",
        f"| mean seconds per problem | {summary['mean_seconds_per_problem']:.3f} |",
        f"| grading status | {summary['grading_status']} |",
        f"| grader disagreements (math-verify vs fallback) | {summary['grader_disagreements']} |",
        f"| finish reasons | {summary['finish_reasons']} |",
        "",
    ]
    strat = manifest.get("strategy")
    if strat:
        mc = {k: sum(r.get("cost", {}).get(k, 0) for r in records) / max(1, len(records)) for k in _COST_KEYS}
        lines += [
            "",
            f"## Strategy: {strat.get('name')}",
            "",
            f"- budget: {strat.get('budget', {}).get('max_generated_tokens')} generated tokens per problem; "
            f"max {strat.get('budget', {}).get('max_tokens')} tokens per completion",
            f"- config: `{json.dumps(strat.get('config'), default=str)}`",
            f"- second model: {strat.get('second_model')}",
            "",
            "| mean cost per problem | value |",
            "|---|---|",
            *(f"| {k.replace('_', ' ')} | {v:.2f} |" for k, v in mc.items()),
        ]
    lines += [
        "",
        "## By difficulty",
        "",
        "| difficulty | problems | accuracy |",
        "|---|---|---|",
    ]
    for d, v in summary["by_difficulty"].items():
        lines.append(f"| {d} | {v['problems']} | {_fmt(v['accuracy'])} |")
    lines.append("")
    for title, p in plots:
        lines += [f"### {title}", "", f"![{title}]({p.relative_to(base).as_posix()})", ""]
    dis = [(r["id"], s) for r in records for s in r["samples"] if s.get("disagreement")]
    if dis:
        lines += [
            "## Grader disagreements",
            "",
            "| problem | sample | gold | answer | math-verify | fallback |",
            "|---|---|---|---|---|---|",
        ]
        for pid, s in dis[:50]:
            gold = next(r["gold"] for r in records if r["id"] == pid)
            lines.append(
                f"| {pid} | {s['index']} | `{gold}` | `{s['answer']}` | {s['math_verify']} | {s['fallback']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _md_to_html(md: str, plots: list[tuple[str, Path]], base: Path) -> str:
    """A small markdown subset (headings, tables, lists, images) to self-contained HTML."""
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ditto eval report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}</style></head><body>",
    ]
    images = {p.relative_to(base).as_posix(): p for _, p in plots}
    in_table = in_list = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{html.escape(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            data = base64.b64encode(images[src].read_bytes()).decode() if src in images else ""
            out.append(f"<img alt='{html.escape(src)}' src='data:image/png;base64,{data}'>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> Path:
    """(Re)write report.md, report.html and plots/ for a run folder. Returns the report.md path."""
    run = Path(run_dir)
    manifest, records = _load(run)
    if not records:
        raise ValueError(f"{run} has no results")
    summary = summarize(records, seed=manifest.get("config", {}).get("seed", 0))
    summary["task"] = manifest.get("config", {}).get("task")
    plots = _plots(records, summary, run / "plots")
    md = render_markdown(manifest, summary, plots, records, run)
    (run / "report.md").write_text(md, encoding="utf-8")
    (run / "report.html").write_text(_md_to_html(md, plots, run), encoding="utf-8")
    return run / "report.md"


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
    return st.get("name"), f"{st.get('name')}@{budget}", budget


def compare_strategies(
    runs: list[str | Path], *, baseline: str | Path | None = None, out: str | Path | None = None, seed: int = 0
) -> tuple[str, dict]:
    """Accuracy [95% Wilson] vs mean cost of several runs on their shared problems, each paired against a baseline.

    The baseline of a run is `baseline` when given, else the self-consistency run whose budget is closest to
    the run's own (equal tokens), else the first folder. Writes compare.md, compare.json and compare.png into
    `out` (default: the first folder). Returns (markdown, numbers).
    """
    paths = [Path(r) for r in runs]
    loaded = []
    for p in paths:
        manifest, records = _load(p)
        if not records:
            raise ValueError(f"{p} has no results")
        strategy, label, budget = _run_label(manifest, p)
        loaded.append({"path": p, "manifest": manifest, "records": records, "strategy": strategy, "budget": budget})
        loaded[-1]["label"] = label
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
        if x["budget"] is None:
            return cands[0]
        return min(cands, key=lambda y: abs((y["budget"] or 0) - x["budget"]))

    lines = [
        "# compare: accuracy vs cost",
        "",
        f"{len(ids)} shared problems; accuracy with 95% Wilson interval; costs are means per problem "
        "(tokens generated / scored by every model, backend calls, wall seconds). Each run is paired with its "
        "baseline (the self-consistency run at the closest budget unless --baseline): McNemar exact p and the "
        "paired-bootstrap difference (run - baseline) with its 95% CI.",
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
    png = _cost_plot(loaded, out_dir / "compare.png")
    lines += ["", f"![accuracy vs cost]({png.name})", ""]
    text = "\n".join(lines)
    (out_dir / "compare.md").write_text(text, encoding="utf-8")
    numbers = {"problems": len(ids), "runs": rows, "markdown": str(out_dir / "compare.md"), "plot": str(png)}
    (out_dir / "compare.json").write_text(json.dumps(numbers, indent=2, default=str), encoding="utf-8")
    return text, numbers


def _cost_plot(loaded: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for x in loaded:
        groups.setdefault(x["strategy"], []).append(x)
    colors = plt.get_cmap("tab20").colors
    for i, (name, xs) in enumerate(groups.items()):
        xs = sorted(xs, key=lambda x: x["mean_cost"]["generated_tokens"])
        tok = [max(1e-9, x["mean_cost"]["generated_tokens"]) for x in xs]
        acc = [x["accuracy"] for x in xs]
        err = [
            [max(0.0, a - x["ci95"][0]) for a, x in zip(acc, xs)],
            [max(0.0, x["ci95"][1] - a) for a, x in zip(acc, xs)],
        ]
        style = dict(fmt="osD^v<>ph*X"[i % 11] + "-", color=colors[(2 * i) % 20 + (i // 10) % 2])
        ax.errorbar(tok, acc, yerr=err, capsize=3, label=name, alpha=0.85, **style)
        for t, a, x in zip(tok, acc, xs):
            if x["budget"] is not None:
                ax.annotate(str(x["budget"]), (t, a), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if all(x["mean_cost"]["generated_tokens"] > 0 for x in loaded):
        ax.set_xscale("log")
    ax.set_xlabel("mean generated tokens per problem (all models)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Accuracy vs cost (labels: token budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
