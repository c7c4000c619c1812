"""Detection statistics for verification scores (higher score = more suspicious).

Convention everywhere: a run is flagged when `score > threshold`. Scores may be +inf (e.g. a
claimed token the reference filtered out); NaN is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _scores(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


def calibrate_threshold(honest_scores: Sequence[float], fpr: float = 0.01) -> float:
    """The smallest threshold, among the honest scores, that flags at most floor(fpr * n) of them.

    Flagging rule: score > threshold. With n honest runs at most floor(fpr * n) exceed it, so
    fpr < 1/n gives max(honest) (no honest run flagged).
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    s = np.sort(_scores(honest_scores, "honest_scores"))
    allowed = math.floor(fpr * s.size + 1e-9)  # allowed false positives
    return float(s[s.size - 1 - allowed])


def auc(negative_scores: Sequence[float], positive_scores: Sequence[float]) -> float:
    """Area under the ROC curve: P(pos > neg) + 0.5 P(pos == neg) (Mann-Whitney U / (n_neg n_pos))."""
    neg = _scores(negative_scores, "negative_scores")
    pos = _scores(positive_scores, "positive_scores")
    both = np.concatenate([neg, pos])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # average rank (1-based) of each distinct value: ties share the mean of their ranks
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum_pos = avg_rank[inverse[neg.size :]].sum()
    u = rank_sum_pos - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def tpr_at_fpr(negative_scores: Sequence[float], positive_scores: Sequence[float], fpr: float = 0.01) -> float:
    """Fraction of positives flagged at the threshold calibrated on the negatives for `fpr`."""
    thr = calibrate_threshold(negative_scores, fpr)
    pos = _scores(positive_scores, "positive_scores")
    return float((pos > thr).mean())
