"""Report plots (matplotlib, Agg backend): the four plots of one run, and accuracy vs cost over runs."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Lay out, write (100 dpi) and close a figure; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _plots(records: list[dict], summary: dict, out: Path) -> list[tuple[str, Path]]:
    plt = _pyplot()
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
    made.append(("Accuracy vs k", _save(fig, out / "accuracy_vs_k.png")))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ok = [s["n_tokens"] for r in records for s in r["samples"] if s["correct"]]
    bad = [s["n_tokens"] for r in records for s in r["samples"] if not s["correct"]]
    ax.hist([ok, bad], bins=30, stacked=True, label=["correct", "wrong"], color=["tab:green", "tab:red"])
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title("Response length")
    made.append(("Response length", _save(fig, out / "length_hist.png")))

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
    made.append(("Accuracy by difficulty", _save(fig, out / "by_difficulty.png")))

    rates = [r["n_correct"] / max(1, len(r["samples"])) for r in records]
    n = summary["samples_per_problem"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = [(i - 0.5) / n for i in range(n + 2)] if n <= 64 else 20
    ax.hist(rates, bins=bins, color="tab:purple", edgecolor="white")
    ax.set_xlabel(f"per-problem solve rate (over {n} samples)")
    ax.set_ylabel("problems")
    ax.set_title("Distribution of per-problem solve rates")
    made.append(("Per-problem solve rates", _save(fig, out / "solve_rates.png")))
    return made


def _cost_plot(loaded: list[dict], path: Path, baselines: tuple[str, ...] = ()) -> Path:
    """Accuracy [95% CI] against mean generated tokens (log axis), one line per strategy variant.

    The `baselines` strategies (majority voting) are drawn in black and thicker: the curve the others must beat.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    groups: dict[str, list[dict]] = {}
    for x in loaded:
        groups.setdefault(x.get("variant", x["strategy"]), []).append(x)
    colors = plt.get_cmap("tab10").colors  # with 11 markers: distinct (colour, marker) pairs for 110 variants
    for i, (name, xs) in enumerate(groups.items()):
        xs = sorted(xs, key=lambda x: x["mean_cost"]["generated_tokens"])
        tok = [max(1e-9, x["mean_cost"]["generated_tokens"]) for x in xs]
        acc = [x["accuracy"] for x in xs]
        err = [
            [max(0.0, a - x["ci95"][0]) for a, x in zip(acc, xs)],
            [max(0.0, x["ci95"][1] - a) for a, x in zip(acc, xs)],
        ]
        style = dict(fmt="osD^v<>ph*X"[i % 11] + "-", color=colors[i % 10], alpha=0.85)
        if xs[0]["strategy"] in baselines:
            style |= dict(color="black", linewidth=2.2, alpha=1.0, zorder=3)
        ax.errorbar(tok, acc, yerr=err, capsize=3, label=name, **style)
        for t, a, x in zip(tok, acc, xs):
            if x["budget"] is not None:
                ax.annotate(str(x["budget"]), (t, a), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if all(x["mean_cost"]["generated_tokens"] > 0 for x in loaded):
        ax.set_xscale("log")
    ax.set_xlabel("mean generated tokens per problem (all models)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, min(1.0, max(x["ci95"][1] for x in loaded) + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("Accuracy vs cost (labels: token budget; black: majority voting)")
    return _save(fig, path)
