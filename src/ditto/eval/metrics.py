"""Metrics for sampled evaluation: Wilson intervals, unbiased pass@k, maj@k, paired comparisons.

All functions are pure and deterministic (resampling uses an explicit seed).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (by default) Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the bounds are exactly 0 / 1 at the edges (the float formula leaves ~1e-18 there)
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    # numerically stable product form
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _majority_correct(keys: list, correct: list[bool]) -> float:
    """Expected correctness of a majority vote among samples (ties split evenly; None keys abstain)."""
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [k for k, v in votes.items() if v == top]
    key_correct = {}
    for k, c in zip(keys, correct):
        if k is not None:
            key_correct[k] = key_correct.get(k, False) or bool(c)
    return sum(key_correct[w] for w in winners) / len(winners)


def maj_at_k(keys: list, correct: list[bool], k: int, *, max_subsets: int = 2000, seed: int = 0) -> float:
    """Expected accuracy of majority voting over k of the n samples of one problem.

    Exact average over all k-subsets when there are at most `max_subsets`, else a seeded Monte-Carlo
    estimate over `max_subsets` random subsets. `keys` are answer keys (None = no answer).
    """
    n = len(keys)
    if k > n:
        raise ValueError(f"maj@{k} needs at least {k} samples, got n={n}")
    if k == n:
        return _majority_correct(keys, correct)
    if math.comb(n, k) <= max_subsets:
        subsets = itertools.combinations(range(n), k)
        total = count = 0
        for s in subsets:
            total += _majority_correct([keys[i] for i in s], [correct[i] for i in s])
            count += 1
        return total / count
    rng = random.Random(seed)
    total = 0.0
    for _ in range(max_subsets):
        s = rng.sample(range(n), k)
        total += _majority_correct([keys[i] for i in s], [correct[i] for i in s])
    return total / max_subsets


def ks_for(n: int) -> list[int]:
    """k values to report for n samples: powers of two up to n, plus n."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


# ----------------------------------------------------------------------------------------------
# paired comparison of two runs
# ----------------------------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b = pairs only A got right, c = pairs only B got right."""
    n = b + c
    if n == 0:
        return 1.0
    m = min(b, c)
    tail = sum(math.comb(n, i) for i in range(m + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[float], b: list[float], *, iters: int = 10000, seed: int = 0) -> dict:
    """Paired bootstrap over problems of mean(b) - mean(a): point estimate, 95% CI, two-sided p."""
    if len(a) != len(b):
        raise ValueError("paired bootstrap needs equally long lists")
    n = len(a)
    if n == 0:
        return {"diff": 0.0, "ci95": (0.0, 0.0), "p_value": 1.0, "iters": 0}
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    diff = float(d.mean())
    # every resample at once: (iters, n) indices drawn with replacement -> (iters,) sorted mean differences
    stats = np.sort(d[np.random.default_rng(seed).integers(0, n, size=(iters, n))].mean(axis=1))
    lo = float(stats[int(0.025 * iters)])
    hi = float(stats[min(iters - 1, int(0.975 * iters))])
    # two-sided p: how often the resampled difference lands on the other side of zero (doubled)
    if diff > 0:
        p = 2 * float(np.count_nonzero(stats <= 0)) / iters
    elif diff < 0:
        p = 2 * float(np.count_nonzero(stats >= 0)) / iters
    else:
        p = 1.0
    return {"diff": diff, "ci95": (lo, hi), "p_value": min(1.0, p), "iters": iters}


@dataclass
class Comparison:
    n_problems: int
    acc_a: float
    acc_b: float
    both: int
    only_a: int
    only_b: int
    neither: int
    mcnemar_p: float
    bootstrap: dict
    significant: bool
    basis: str

    def verdict(self, alpha: float = 0.05) -> str:
        diff = self.acc_b - self.acc_a
        if self.significant:
            better = "B" if diff > 0 else "A"
            return f"real difference: {better} is better by {abs(diff) * 100:.1f} points (p < {alpha})"
        return "no significant difference (could be noise)"


def compare_runs(
    a: dict[str, list[bool]], b: dict[str, list[bool]], *, alpha: float = 0.05, seed: int = 0
) -> Comparison:
    """Compare two runs on the problems they share. a, b: problem id -> per-sample correctness.

    McNemar (exact) pairs the first sample of each problem (for n = 1 runs this is the standard test);
    the paired bootstrap uses every sample through each problem's success rate. The difference is
    called significant when the bootstrap 95% CI excludes 0 and, for single-sample runs, McNemar agrees.
    """
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("the two runs share no problems")
    both = only_a = only_b = neither = 0
    ra, rb = [], []
    for pid in ids:
        xa, xb = bool(a[pid][0]), bool(b[pid][0])
        both += xa and xb
        only_a += xa and not xb
        only_b += xb and not xa
        neither += not xa and not xb
        ra.append(sum(a[pid]) / len(a[pid]))
        rb.append(sum(b[pid]) / len(b[pid]))
    p = mcnemar_exact(only_a, only_b)
    boot = paired_bootstrap(ra, rb, seed=seed)
    lo, hi = boot["ci95"]
    single = all(len(a[i]) == 1 and len(b[i]) == 1 for i in ids)
    excl = lo > 0 or hi < 0
    significant = (excl and p < alpha) if single else (excl and boot["p_value"] < alpha)
    return Comparison(
        n_problems=len(ids),
        acc_a=sum(ra) / len(ids),
        acc_b=sum(rb) / len(ids),
        both=both,
        only_a=only_a,
        only_b=only_b,
        neither=neither,
        mcnemar_p=p,
        bootstrap=boot,
        significant=significant,
        basis="mcnemar+bootstrap" if single else "paired bootstrap over per-problem success rates",
    )


def summarize(records: list[dict], *, seed: int = 0) -> dict:
    """Aggregate metrics of a run from its per-problem records (see runner.py for the record shape)."""
    n_probs = len(records)
    if not n_probs:
        return {"problems": 0}
    n = min(len(r["samples"]) for r in records)
    total_samples = sum(len(r["samples"]) for r in records)
    correct_samples = sum(s["correct"] for r in records for s in r["samples"])
    lo, hi = wilson_interval(correct_samples, total_samples)
    first_correct = sum(bool(r["samples"][0]["correct"]) for r in records)
    out: dict = {
        "problems": n_probs,
        "samples_per_problem": n,
        "samples": total_samples,
        "accuracy": correct_samples / total_samples,
        "accuracy_ci95": [lo, hi],
        "accuracy_ci_note": "Wilson interval over all samples (samples of one problem are correlated; "
        "see first-sample accuracy for a problem-level interval)",
        "first_sample_accuracy": first_correct / n_probs,
        "first_sample_accuracy_ci95": list(wilson_interval(first_correct, n_probs)),
        "pass_at_k": {},
        "maj_at_k": {},
    }
    for k in ks_for(n):
        out["pass_at_k"][k] = (
            sum(pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), k) for r in records) / n_probs
        )
        out["maj_at_k"][k] = (
            sum(
                maj_at_k([s.get("key") for s in r["samples"]], [s["correct"] for s in r["samples"]], k, seed=seed)
                for r in records
            )
            / n_probs
        )
    rates = [sum(s["correct"] for s in r["samples"]) / len(r["samples"]) for r in records]
    out["solve_rate"] = {
        "mean": sum(rates) / n_probs,
        "never": sum(x == 0 for x in rates) / n_probs,
        "always": sum(x == 1 for x in rates) / n_probs,
        "sometimes": sum(0 < x < 1 for x in rates) / n_probs,
    }
    toks = [s["n_tokens"] for r in records for s in r["samples"]]
    out["mean_tokens_per_sample"] = sum(toks) / len(toks)
    out["mean_tokens_per_problem"] = sum(toks) / n_probs
    out["mean_seconds_per_problem"] = sum(r.get("seconds", 0.0) for r in records) / n_probs
    statuses = Counter(s.get("status", "ok") for r in records for s in r["samples"])
    out["grading_status"] = dict(statuses)
    out["grader_disagreements"] = sum(bool(s.get("disagreement")) for r in records for s in r["samples"])
    out["finish_reasons"] = dict(Counter(s.get("finish_reason") for r in records for s in r["samples"]))
    by_diff: dict[str, list[float]] = {}
    for r, rate in zip(records, rates):
        by_diff.setdefault(str(r.get("difficulty")), []).append(rate)
    out["by_difficulty"] = {k: {"problems": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_diff.items())}
    return out
