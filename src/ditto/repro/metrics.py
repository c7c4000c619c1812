"""Study metrics: how much do outputs move when only the inference configuration changes?

Metrics follow "Give Me FP32 or Give Me Death" (divergence index, std of accuracy across configs,
response-length std) and "The Silent Hyperparameter" / "Stochastic CHAOS" (distinct outputs,
agreement rate). All functions are pure: they take per-config results and return numbers.

`results` everywhere is ``{config_name: {prompt_id: record}}`` where a record has at least
``token_ids`` (list[int]), ``answer`` (str | None) and ``correct`` (bool).
"""

from __future__ import annotations

import math
from itertools import combinations


def divergence_index(a: list[int], b: list[int]) -> int | None:
    """Index of the first generated token where `a` and `b` differ; None when they are identical.

    When one is a strict prefix of the other, the index is the shorter length (the point where one
    stopped and the other went on).
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return None if len(a) == len(b) else n


def distinct_count(seqs: list[list[int]]) -> int:
    """Number of distinct token sequences."""
    return len({tuple(s) for s in seqs})


def agreement(xs: list, ys: list) -> float:
    """Fraction of positions where xs[i] == ys[i] (lists are compared whole); nan for empty input."""
    if len(xs) != len(ys):
        raise ValueError(f"length mismatch: {len(xs)} vs {len(ys)}")
    if not xs:
        return math.nan
    return sum(1 for x, y in zip(xs, ys) if _norm(x) == _norm(y)) / len(xs)


def _norm(x):
    return tuple(x) if isinstance(x, list) else x


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def std(values: list[float], ddof: int = 1) -> float:
    """Standard deviation (sample std with ddof=1 by default); 0.0 for fewer than ddof+1 values."""
    n = len(values)
    if n <= ddof:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - ddof))


def common_ids(results: dict[str, dict[str, dict]]) -> list[str]:
    """Prompt ids present in every config, in the first config's order."""
    if not results:
        return []
    names = list(results)
    first = list(results[names[0]])
    return [pid for pid in first if all(pid in results[n] for n in names[1:])]


def pairwise(results: dict[str, dict[str, dict]], ids: list[str], key: str) -> list[list[float]]:
    """Matrix M[i][j] = agreement of configs i and j on field `key` over `ids` (diagonal 1)."""
    names = list(results)
    m = [[1.0] * len(names) for _ in names]
    for i, j in combinations(range(len(names)), 2):
        a = [results[names[i]][p][key] for p in ids]
        b = [results[names[j]][p][key] for p in ids]
        m[i][j] = m[j][i] = agreement(a, b)
    return m


def study_metrics(results: dict[str, dict[str, dict]], reference: str | None = None) -> dict:
    """Every metric of the study report, computed over the prompts all configs answered."""
    names = list(results)
    if not names:
        return {"configs": [], "prompts": 0}
    reference = reference if reference in results else names[0]
    ids = common_ids(results)
    per_config = {}
    for n in names:
        recs = [results[n][p] for p in ids]
        lengths = [len(r["token_ids"]) for r in recs]
        ref_div = [divergence_index(results[reference][p]["token_ids"], results[n][p]["token_ids"]) for p in ids]
        per_config[n] = {
            "accuracy": mean([float(r["correct"]) for r in recs]),
            "correct": sum(bool(r["correct"]) for r in recs),
            "mean_length": mean(lengths),
            "exact_match_vs_ref": agreement(
                [r["token_ids"] for r in recs], [results[reference][p]["token_ids"] for p in ids]
            ),
            "answer_match_vs_ref": agreement(
                [r["answer"] for r in recs], [results[reference][p]["answer"] for p in ids]
            ),
            "diverged_vs_ref": sum(d is not None for d in ref_div),
            "median_divergence_vs_ref": _median([d for d in ref_div if d is not None]),
        }
    distinct = [distinct_count([results[n][p]["token_ids"] for n in names]) for p in ids]
    distinct_ans = [len({results[n][p]["answer"] for n in names}) for p in ids]
    len_std = [std([len(results[n][p]["token_ids"]) for n in names]) for p in ids]
    ref_divs = [
        d
        for n in names
        if n != reference
        for p in ids
        if (d := divergence_index(results[reference][p]["token_ids"], results[n][p]["token_ids"])) is not None
    ]
    pair_divs = [
        d
        for a, b in combinations(names, 2)
        for p in ids
        if (d := divergence_index(results[a][p]["token_ids"], results[b][p]["token_ids"])) is not None
    ]
    exact = pairwise(results, ids, "token_ids")
    answers = pairwise(results, ids, "answer")
    off = [(i, j) for i, j in combinations(range(len(names)), 2)]
    accs = [per_config[n]["accuracy"] for n in names]
    return {
        "configs": names,
        "reference": reference,
        "prompts": len(ids),
        "per_config": per_config,
        "accuracy_mean": mean(accs),
        "accuracy_std": std(accs),
        "accuracy_min": min(accs),
        "accuracy_max": max(accs),
        "distinct_outputs": distinct,
        "distinct_outputs_mean": mean(distinct),
        "distinct_outputs_max": max(distinct) if distinct else 0,
        "prompts_all_identical": sum(d == 1 for d in distinct),
        "distinct_answers_mean": mean(distinct_ans),
        "response_length_std_mean": mean(len_std),
        "divergence_vs_ref": ref_divs,
        "divergence_pairwise": pair_divs,
        "divergence_vs_ref_median": _median(ref_divs),
        "divergence_pairwise_median": _median(pair_divs),
        "pairwise_exact": exact,
        "pairwise_answer": answers,
        "exact_agreement_mean": mean([exact[i][j] for i, j in off]) if off else 1.0,
        "answer_agreement_mean": mean([answers[i][j] for i, j in off]) if off else 1.0,
    }


def _median(xs: list[int]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = len(s) // 2
    return float(s[k]) if len(s) % 2 else (s[k - 1] + s[k]) / 2
