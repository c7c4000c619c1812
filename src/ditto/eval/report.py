"""Reports: report.md and report.html (with matplotlib plots) for a run folder, and run comparisons.

Modules: ditto.eval.report_render (run folder reading, report.md, markdown -> HTML), ditto.eval.report_plots
(matplotlib plots), ditto.eval.report_compare (compare, compare_strategies); this one writes a run's report
and re-exports the public names.
"""

from __future__ import annotations

from pathlib import Path

from ditto.eval.metrics import summarize
from ditto.eval.report_compare import BASELINE_STRATEGIES, compare, compare_strategies, is_strategy_run
from ditto.eval.report_plots import _plots
from ditto.eval.report_render import _load, _md_to_html, render_markdown

__all__ = [
    "BASELINE_STRATEGIES",
    "compare",
    "compare_strategies",
    "is_strategy_run",
    "render_markdown",
    "write_report",
]


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
