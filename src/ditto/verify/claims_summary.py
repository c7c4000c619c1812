"""The summary of a claims verification: how many of each status, the worst claim, its first divergence."""

from __future__ import annotations

_SEVERITY = {"inconsistent": 4, "error": 3, "unverifiable": 2, "consistent": 1, "exact": 0}


def _ratio(doc: dict) -> float:
    score, threshold = doc.get("score"), doc.get("threshold")
    if score == "inf":
        return float("inf")
    if not isinstance(score, int | float) or not isinstance(threshold, int | float):
        return 0.0
    return score / threshold if threshold > 0 else (float("inf") if score > 0 else 0.0)


def summarize(results: list[dict]) -> dict:
    """{n, counts: {status: n}, ok, worst: result | None} over claim results (Verdict dicts or errors).

    The worst is the most severe status (inconsistent, then unreadable lines, then unverifiable),
    and among equals the highest score relative to its threshold."""
    counts: dict[str, int] = {}
    for doc in results:
        counts[doc["status"]] = counts.get(doc["status"], 0) + 1
    worst = max(results, key=lambda d: (_SEVERITY.get(d["status"], 3), _ratio(d)), default=None)
    ok = counts.get("exact", 0) + counts.get("consistent", 0)
    return {"n": len(results), "ok": ok, "counts": counts, "worst": worst}


def summary_text(summary: dict) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary["counts"].items()))
    out = f"claims: {summary['ok']} of {summary['n']} exact or consistent ({counts})"
    worst = summary["worst"]
    if worst is None or worst["status"] in ("exact", "consistent") and summary["ok"] == summary["n"] > 1:
        if worst is not None:
            out += f"\n  highest score: {worst['file']} ({worst['method']}, score {_fmt(worst.get('score'))})"
        return out
    out += f"\n  worst: {worst['file']}: {worst['status'].upper()}: {worst['reason']}"
    fd = worst.get("first_divergence")
    if fd:
        out += (
            f"\n  its first divergence: output token {fd['index']}, claimed {fd['claimed_id']} {fd['claimed_text']!r}"
            f" vs reference {fd['reference_id']} {fd['reference_text']!r}"
        )
    return out


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)
