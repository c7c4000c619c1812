"""Compare what a receipt claims with what the trusted replay computed, field by field.

Three claimed fields are replayed per output token: the token id (is it what the reference sampler
picks: its Token-DiFR margin is 0), its log-probability (log_softmax of the reference logits, as the
engine computes it) and, when present, its Activation-DiFR fingerprint.

Bitwise comparison flags every position where a field differs at all. Tolerance comparison flags
what is above each field's tolerance: tokens when the Token-DiFR score (clipped-mean margin) is above
`Thresholds.token` (then every position with a margin > 0); a logprob whose |claimed - reference| is
above `Thresholds.logprob_abs`; fingerprints when their mean L2 distance is above
`Thresholds.activation` (then every token whose distance is). Differences below a tolerance are still
counted and reported (`different`, `max_abs_diff`): nothing is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ditto.verify.token_difr import TokenDifrResult
from ditto.verify.verdict import Thresholds

__all__ = ["FieldReport", "compare_fields", "first_difference", "reference_logprobs"]

FIELDS = ("output_token_ids", "output_logprobs", "fingerprints")  # reported in this order at one position


@dataclass(frozen=True)
class FieldReport:
    """One claimed field against the replay."""

    field: str
    n_compared: int
    n_different: int  # positions whose value is not bit-identical
    flagged: tuple[int, ...]  # positions that fail the comparison (bitwise: every difference)
    max_abs_diff: float  # 0.0 when identical (tokens: the largest finite margin)
    tolerance: float | None  # None under bitwise comparison
    score: float | None  # what the tolerance judges: tokens the Token-DiFR score, fingerprints the mean distance
    claimed: tuple  # per flagged position, what the receipt claims
    reference: tuple  # ... and what the replay computed

    def to_dict(self) -> dict:
        return {
            "field": self.field,
            "compared": self.n_compared,
            "different": self.n_different,
            "flagged": len(self.flagged),
            "first_flagged": self.flagged[0] if self.flagged else None,
            "max_abs_diff": self.max_abs_diff,
            "score": self.score,
            "tolerance": self.tolerance,
        }


def reference_logprobs(logits: torch.Tensor, ids) -> list[float]:
    """Each claimed token's log-probability, row by row exactly as the engine computes it when it samples."""
    vocab = logits.shape[1]
    out = []
    for t, tok in enumerate(ids):
        if not 0 <= tok < vocab:
            out.append(math.nan)
            continue
        out.append(float(torch.log_softmax(logits[t].float(), dim=-1)[tok]))
    return out


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _tokens(res: TokenDifrResult, tolerance: float | None) -> FieldReport:
    diff = [t for t, m in enumerate(res.margins) if m != 0.0]
    flagged = diff if tolerance is None or res.score > tolerance else []
    finite = [m for m in res.margins if math.isfinite(m)]
    return FieldReport(
        "output_token_ids",
        res.n_tokens,
        len(diff),
        tuple(flagged),
        max(finite, default=0.0),
        tolerance,
        res.score,
        tuple(res.claimed_ids[t] for t in flagged),
        tuple(res.reference_ids[t] for t in flagged),
    )


def _logprobs(claimed: tuple[float, ...], ref: list[float], tolerance: float | None) -> FieldReport:
    diff = [t for t, (c, r) in enumerate(zip(claimed, ref)) if not _same(c, r)]
    gaps = [abs(claimed[t] - ref[t]) for t in diff]
    gaps = [math.inf if math.isnan(g) else g for g in gaps]  # NaN on one side only: as far apart as can be
    flagged = diff if tolerance is None else [t for t, g in zip(diff, gaps) if g > tolerance]
    return FieldReport(
        "output_logprobs",
        len(claimed),
        len(diff),
        tuple(flagged),
        max(gaps, default=0.0),
        tolerance,
        None,
        tuple(claimed[t] for t in flagged),
        tuple(ref[t] for t in flagged),
    )


def _fingerprints(claimed, ref: np.ndarray, tolerance: float | None) -> FieldReport:
    c = np.asarray(claimed, dtype=np.float64)  # (T, k)
    dist = np.linalg.norm(c - ref, axis=1)  # (T,)
    diff = [t for t in range(len(c)) if not np.array_equal(c[t], ref[t])]
    mean = float(dist.mean()) if dist.size else 0.0
    flagged = diff if tolerance is None else ([t for t in diff if dist[t] > tolerance] if mean > tolerance else [])
    return FieldReport(
        "fingerprints",
        len(c),
        len(diff),
        tuple(flagged),
        float(dist.max()) if dist.size else 0.0,
        tolerance,
        mean,
        tuple(tuple(c[t].tolist()) for t in flagged),
        tuple(tuple(ref[t].tolist()) for t in flagged),
    )


def compare_fields(
    res: TokenDifrResult,
    claimed_logprobs: tuple[float, ...] | None,
    ref_logprobs: list[float] | None,
    claimed_fps,
    ref_fps: np.ndarray | None,
    *,
    bitwise: bool,
    th: Thresholds,
) -> list[FieldReport]:
    """A FieldReport per claimed field (tokens always; logprobs and fingerprints when the receipt has them)."""
    reports = [_tokens(res, None if bitwise else th.token)]
    if claimed_logprobs is not None and ref_logprobs is not None:
        reports.append(_logprobs(claimed_logprobs, ref_logprobs, None if bitwise else th.logprob_abs))
    if claimed_fps is not None and ref_fps is not None:
        reports.append(_fingerprints(claimed_fps, ref_fps, None if bitwise else th.activation))
    return reports


def first_difference(reports: list[FieldReport]) -> dict | None:
    """The first flagged position over all fields (tokens before logprobs before fingerprints at one position)."""
    best = None
    for rep in reports:
        if not rep.flagged:
            continue
        key = (rep.flagged[0], FIELDS.index(rep.field))
        if best is None or key < best[0]:
            best = (key, rep)
    if best is None:
        return None
    rep = best[1]
    return {"field": rep.field, "index": rep.flagged[0], "claimed": rep.claimed[0], "reference": rep.reference[0]}
