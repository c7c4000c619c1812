"""Metrics: pass@k vs brute force, maj@k, Wilson intervals, McNemar, bootstrap, summaries."""

from __future__ import annotations

import itertools
import math

import pytest

from ditto.eval.metrics import (
    compare_runs,
    ks_for,
    maj_at_k,
    mcnemar_exact,
    paired_bootstrap,
    pass_at_k,
    summarize,
    wilson_interval,
)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_maj_at_k_matches_enumeration():
    keys = ["5", "5", "7", None, "7", "5"]
    correct = [True, True, False, False, False, True]
    # k = n: 5 wins 3-2
    assert maj_at_k(keys, correct, 6) == 1.0
    # k = 1: the sample itself (None abstains -> wrong)
    assert maj_at_k(keys, correct, 1) == pytest.approx(3 / 6)
    # k = 2 brute force, ties split evenly
    vals = []
    for s in itertools.combinations(range(6), 2):
        ks = [keys[i] for i in s if keys[i] is not None]
        if not ks:
            vals.append(0.0)
        elif len(set(ks)) == 1:
            vals.append(1.0 if ks[0] == "5" else 0.0)
        else:
            vals.append(0.5)
    assert maj_at_k(keys, correct, 2) == pytest.approx(sum(vals) / len(vals))
    # Monte Carlo path is seeded and close to the exact value
    big_keys = ["a"] * 12 + ["b"] * 8
    big_ok = [True] * 12 + [False] * 8
    exact = maj_at_k(big_keys, big_ok, 5, max_subsets=10**6)
    mc = maj_at_k(big_keys, big_ok, 5, max_subsets=3000, seed=1)
    assert mc == maj_at_k(big_keys, big_ok, 5, max_subsets=3000, seed=1)
    assert abs(mc - exact) < 0.03


def test_wilson_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # at the edges the bounds are exact for any n (the float formula alone leaves 1.7e-18 at 0 of 200)
    for n in (1, 7, 200, 1000):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_mcnemar_hand_case():
    # 10 discordant pairs split 9/1: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)


def test_compare_runs_significance():
    a = {f"p{i}": [i < 20] for i in range(100)}
    b = {f"p{i}": [i < 60] for i in range(100)}
    cmp = compare_runs(a, b)
    assert (cmp.only_a, cmp.only_b, cmp.both, cmp.neither) == (0, 40, 20, 40)
    assert cmp.significant and "B is better" in cmp.verdict()
    close = compare_runs(a, {f"p{i}": [i < 22] for i in range(100)})  # 2 discordant pairs: noise
    assert (close.only_a, close.only_b) == (0, 2) and not close.significant
    assert "no significant difference" in close.verdict()
    tiny = compare_runs({"x": [True], "y": [False]}, {"x": [False], "y": [True]})
    assert not tiny.significant


def test_paired_bootstrap_seeded():
    a = [0.0, 0.5, 1.0, 0.25] * 10
    b = [0.5, 0.5, 1.0, 0.75] * 10
    r1, r2 = paired_bootstrap(a, b, iters=2000, seed=3), paired_bootstrap(a, b, iters=2000, seed=3)
    assert r1 == r2
    assert r1["diff"] == pytest.approx(0.25)
    assert r1["ci95"][0] > 0 and r1["p_value"] < 0.05


def test_summarize_shapes():
    recs = []
    for i in range(4):
        samples = [
            {"correct": j < i, "key": str(j < i), "n_tokens": 10 + j, "status": "ok", "finish_reason": "stop"}
            for j in range(4)
        ]
        recs.append({"id": str(i), "difficulty": i % 2, "samples": samples, "seconds": 0.5, "n_correct": i})
    s = summarize(recs)
    assert s["problems"] == 4 and s["samples_per_problem"] == 4
    assert s["accuracy"] == pytest.approx(6 / 16)
    assert list(s["pass_at_k"]) == ks_for(4) == [1, 2, 4]
    assert s["pass_at_k"][4] == pytest.approx(3 / 4)
    assert s["solve_rate"]["never"] == 0.25 and s["solve_rate"]["sometimes"] == 0.75
    assert s["mean_tokens_per_sample"] == pytest.approx(11.5)
    assert set(s["by_difficulty"]) == {"0", "1"}
    assert math.isclose(s["mean_seconds_per_problem"], 0.5)
