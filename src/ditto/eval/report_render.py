"""Report text: reading a run folder, report.md for one run, and the markdown subset -> HTML converter."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def _load(run: Path) -> tuple[dict, list[dict]]:
    from ditto.eval.runner import load_results

    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    return manifest, load_results(run / "results.jsonl")


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
