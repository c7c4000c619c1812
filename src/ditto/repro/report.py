"""Study report: markdown + self-contained HTML with plots (agreement heatmap, divergence histograms)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ditto.eval.report import _md_to_html
from ditto.repro.metrics import study_metrics
from ditto.repro.runner import load_study


def _plots(m: dict, out: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    plots = []
    names = m["configs"]
    k = len(names)
    for key, title in (("pairwise_exact", "exact-match agreement"), ("pairwise_answer", "answer agreement")):
        fig, ax = plt.subplots(figsize=(2 + 0.45 * k, 1.5 + 0.45 * k))
        im = ax.imshow(m[key], vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
        if k <= 14:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{m[key][i][j]:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, fraction=0.04)
        ax.set_title(f"pairwise {title} ({m['prompts']} prompts)")
        fig.tight_layout()
        p = out / f"{key}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        plots.append((title, p))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ref, pair = m["divergence_vs_ref"], m["divergence_pairwise"]
    hi = max(ref + pair + [1])
    bins = min(40, hi + 1)
    if pair:
        ax.hist(pair, bins=bins, range=(0, hi + 1), alpha=0.5, label=f"pairwise ({len(pair)} diverging pairs)")
    if ref:
        ax.hist(ref, bins=bins, range=(0, hi + 1), alpha=0.7, label=f"vs reference ({len(ref)})")
    ax.set_xlabel("divergence index (first differing generated token)")
    ax.set_ylabel("count")
    ax.set_title("where outputs first diverge")
    if ref or pair:
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "divergence_hist.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    plots.append(("divergence", p))
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * k + 2), 3.5))
    accs = [100 * m["per_config"][n]["accuracy"] for n in names]
    ax.bar(range(k), accs)
    ax.axhline(100 * m["accuracy_mean"], color="k", lw=1, ls="--", label="mean")
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy per config (std {100 * m['accuracy_std']:.2f} pts)")
    fig.tight_layout()
    p = out / "accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    plots.append(("accuracy", p))
    return plots


def _f(x, pct: bool = False, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{nd}f}%" if pct else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def render_markdown(study: dict, m: dict, manifests: dict, plots: list[tuple[str, Path]], base: Path) -> str:
    w = study["workload"]
    lines = [
        "# ditto repro study",
        "",
        f"Workload: task `{w['task']}`, {m['prompts']} prompts, model `{w['model']}`, prompt format `{w['prompt']}`, "
        f"temperature {w['temperature']}, max {w['max_tokens']} new tokens, seed {w['seed']} (workload {w['hash']}).",
        f"Reference config: `{m['reference']}`. Every config got the same prompt token ids.",
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---|",
        f"| configs run | {len(m['configs'])} |",
        f"| accuracy mean / std (sample, across configs) | {_f(m['accuracy_mean'], True)} / "
        f"{_f(m['accuracy_std'] * 100, nd=2)} pts |",
        f"| accuracy min / max | {_f(m['accuracy_min'], True)} / {_f(m['accuracy_max'], True)} |",
        f"| distinct outputs per prompt: mean / max | {_f(m['distinct_outputs_mean'], nd=2)} / "
        f"{m['distinct_outputs_max']} |",
        f"| prompts with one output across all configs | {m['prompts_all_identical']} / {m['prompts']} |",
        f"| distinct answers per prompt (mean) | {_f(m['distinct_answers_mean'], nd=2)} |",
        f"| pairwise exact-match agreement (mean) | {_f(m['exact_agreement_mean'], True)} |",
        f"| pairwise answer agreement (mean) | {_f(m['answer_agreement_mean'], True)} |",
        f"| median divergence index vs reference / pairwise | {_f(m['divergence_vs_ref_median'])} / "
        f"{_f(m['divergence_pairwise_median'])} |",
        f"| response-length std per prompt (mean, tokens) | {_f(m['response_length_std_mean'], nd=2)} |",
        "",
        "## Per config",
        "",
        "| config | accuracy | correct | mean length | exact match vs ref | answer match vs ref | diverged vs ref "
        "| median div. index | tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in m["configs"]:
        c = m["per_config"][n]
        tps = manifests.get(n, {}).get("tokens_per_second")
        lines.append(
            f"| {n} | {_f(c['accuracy'], True)} | {c['correct']} | {_f(c['mean_length'])} | "
            f"{_f(c['exact_match_vs_ref'], True)} | {_f(c['answer_match_vs_ref'], True)} | {c['diverged_vs_ref']} | "
            f"{_f(c['median_divergence_vs_ref'])} | {_f(tps)} |"
        )
    for axis, title, other, what in _AXES:
        groups = _invariance_groups(m, axis)
        if groups:
            fixed = "backend, numerics, determinism" + (f", {other}" if other else "")
            lines += ["", f"## {title} invariance (same {fixed}; {what} differ)", ""]
            lines += [f"| group | {what} | identical outputs on every prompt |", "|---|---|---|"]
            lines += [f"| {g} | {vs} | {'yes' if ok else 'NO'} |" for g, vs, ok in groups]
    if study.get("skipped"):
        lines += ["", "## Skipped configs", "", "| config | reason |", "|---|---|"]
        for s in study["skipped"]:
            c = s["config"]
            name = f"{c['backend']}-{c['numerics']}-{c['determinism']}-b{c['batch_size']}-t{c['threads']}"
            lines.append(f"| {name} | {s['reason'].replace('|', '/')} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{t}]({p.relative_to(base).as_posix()})" for t, p in plots]
    lines += [
        "",
        "## Notes",
        "",
        "- Divergence index: first generated token where two outputs differ (the shorter length if one is a prefix).",
        "- llama_cpp runs one request at a time; its sampler (for temperature > 0) is llama.cpp's, not ditto's.",
        "- transformers batches prompts with identical sampling params, left padded; determinism 'none'.",
        "- Inference stack of each config: configs/<name>/manifest.json (backend_info).",
        "",
    ]
    return "\n".join(lines)


# (axis, section title, what is held fixed, what varies): configs are named backend-numerics-det-b{B}-t{T}.
_AXES = (
    ("batch", "Batch", "threads", "batch sizes"),
    ("threads", "Thread-count", "batch size", "thread counts"),
    ("both", "Batch-and-thread", "", "batch sizes and thread counts"),
)


def _invariance_groups(m: dict, axis: str) -> list[tuple[str, str, bool]]:
    """For configs differing only along `axis` (batch, threads or both): did they produce identical outputs?"""
    names = m["configs"]
    groups: dict[str, list[int]] = {}
    values: dict[int, str] = {}
    for i, n in enumerate(names):
        head, _, rest = n.rpartition("-b")
        bs, _, thr = rest.partition("-t")
        key, values[i] = {"batch": (f"{head}-t{thr}", bs), "threads": (f"{head}-b{bs}", thr)}.get(
            axis, (head, f"b{bs}-t{thr}")
        )
        groups.setdefault(key, []).append(i)
    out = []
    for g, idx in groups.items():
        if len(idx) < 2:
            continue
        ok = all(m["pairwise_exact"][i][j] == 1.0 for i in idx for j in idx)
        out.append((g, ",".join(values[i] for i in idx), ok))
    return out


def write_report(out_dir: str | Path, reference: str | None = None) -> Path:
    """(Re)write report.md, report.html, metrics.json and plots/ for a study folder. Returns report.md."""
    out = Path(out_dir)
    study, results, manifests = load_study(out)
    if not results:
        raise ValueError(f"{out} has no complete configs")
    m = study_metrics(results, reference or study.get("reference"))
    for axis, key in (("batch", "batch_sizes"), ("threads", "threads"), ("both", "variants")):
        groups = _invariance_groups(m, axis)
        m[f"{axis}_invariance"] = [{"group": g, key: v, "identical": ok} for g, v, ok in groups]
    (out / "metrics.json").write_text(json.dumps(m, indent=1), encoding="utf-8")
    plots = _plots(m, out / "plots")
    md = render_markdown(study, m, manifests, plots, out)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(_md_to_html(md, plots, out).replace("ditto eval report", "ditto repro study"))
    return out / "report.md"
