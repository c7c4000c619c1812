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
