"""Token-DiFR: score claimed tokens against a trusted teacher-forced pass with the same seed.

Given the reference logits for each claimed token (row t = the logits the model produced for
predicting claimed token t, from one teacher-forced pass over prompt + claimed tokens), rebuild
exactly what ditto's sampler does (`ditto.sampling.processed_scores` for penalties, temperature
and filters; `ditto.sampling.gumbel_noise` for the noise) and score each token by its margin

    sampled (T > 0):  max_{v in kept} ñ_v - ñ_claimed,   ñ = penalised_logits / T + g(seed, sample, t, v)
    greedy  (T = 0):  max_v l_v - l_claimed             (l = penalised logits; a rank check)

A margin is 0 when the claimed token is exactly what the reference sampler picks, > 0 when it is
not, and +inf when the reference filters the claimed token out (top-k / top-p / min-p) or the id
is outside the vocabulary. Margins are in units of tempered logits (= Gumbel units); DiFR's
`l + T g` margins are T times ours.

The run score is the mean of the margins clipped at `clip`. The default 0.5 follows the DiFR
paper: honest numerical noise gives small margins, and one +inf must not decide a long run on its
own. `clip_from_honest` derives the clip from honest margins (their 99.9th percentile) instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ditto.sampling import SamplingParams, gumbel_noise, processed_scores
from ditto.verify.stats import auc, calibrate_threshold, tpr_at_fpr

__all__ = [
    "DEFAULT_CLIP",
    "TokenDifrResult",
    "auc",
    "calibrate_threshold",
    "clip_from_honest",
    "clipped_mean",
    "score_curve",
    "token_difr",
    "tpr_at_fpr",
    "verdict",
]

DEFAULT_CLIP = 0.5


def clipped_mean(margins: Sequence[float], clip: float = DEFAULT_CLIP, n_tokens: int | None = None) -> float:
    """Mean of min(margin, clip) over the first `n_tokens` margins (all by default); 0.0 if none."""
    m = np.asarray(margins, dtype=np.float64)[:n_tokens]
    if m.size == 0:
        return 0.0
    if np.isnan(m).any():
        raise ValueError("margins contain NaN")
    return float(np.minimum(m, clip).mean())


def score_curve(
    margins: Sequence[float], ns: Iterable[int] = (1, 3, 10, 30, 100, 300), clip: float = DEFAULT_CLIP
) -> dict[int, float]:
    """Clipped-mean score using only the first n tokens, for each n no longer than the run."""
    return {n: clipped_mean(margins, clip, n) for n in ns if n <= len(margins)}


def clip_from_honest(honest_margins: Iterable[float], quantile: float = 0.999) -> float:
    """A clip value: the `quantile` of the finite honest margins (DEFAULT_CLIP if there are none > 0)."""
    m = np.asarray(list(honest_margins), dtype=np.float64)
    m = m[np.isfinite(m)]
    if m.size == 0 or not (m > 0).any():
        return DEFAULT_CLIP
    return float(np.quantile(m, quantile, method="higher"))


@dataclass(frozen=True)
class TokenDifrResult:
    margins: tuple[float, ...]  # per claimed token; 0 = what the reference samples, inf = filtered out
    claimed_ids: tuple[int, ...]
    reference_ids: tuple[int, ...]  # what the reference sampler picks at each position
    clip: float
    score: float  # clipped mean of the margins

    @property
    def n_tokens(self) -> int:
        return len(self.margins)

    @property
    def n_exact(self) -> int:
        return sum(1 for m in self.margins if m == 0.0)

    @property
    def exact(self) -> bool:
        """Every claimed token is exactly what the reference sampler picks."""
        return self.n_exact == self.n_tokens

    @property
    def first_divergence(self) -> int | None:
        """Index (in the output) of the first token with a margin > 0, or None."""
        return next((i for i, m in enumerate(self.margins) if m > 0), None)


def _margin_row(
    logits: torch.Tensor,
    claimed: int,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    previous: Sequence[int],
    sample_index: int,
    token_index: int,
) -> tuple[float, int]:
    """(margin, reference token) for one position, mirroring ditto.sampling.sample_row."""
    scaled, keep = processed_scores(logits, params, prompt_ids, previous)  # (V,) float64, (V,) bool
    vocab = scaled.numel()
    if params.greedy:
        ref = int(torch.argmax(scaled))
        if not 0 <= claimed < vocab:
            return math.inf, ref
        return float(scaled[ref] - scaled[claimed]), ref
    g = gumbel_noise(params.seed, sample_index, token_index, vocab)  # (V,) float64
    noisy = scaled + g
    masked = noisy.masked_fill(~keep, float("-inf"))
    ref = int(torch.argmax(masked))
    if not 0 <= claimed < vocab or not bool(keep[claimed]):
        return math.inf, ref
    return float(masked[ref] - noisy[claimed]), ref


def token_difr(
    logits: torch.Tensor,
    claimed_ids: Sequence[int],
    params: SamplingParams,
    prompt_ids: Sequence[int] = (),
    sample_index: int = 0,
    clip: float = DEFAULT_CLIP,
) -> TokenDifrResult:
    """Token-DiFR margins of `claimed_ids` under reference `logits` (T, V).

    Row t of `logits` must be the reference logits that predict claimed token t (positions
    len(prompt)-1 ... len(prompt)+T-2 of a teacher-forced pass over prompt + claimed tokens), at
    the model's full (padded) vocabulary width, as the sampler saw it. `prompt_ids` feed the
    repetition penalty; `sample_index` and the token position t are the noise coordinates.
    """
    logits = torch.as_tensor(logits).detach().to("cpu")  # the sampler's noise and filters run on CPU
    claimed = [int(t) for t in claimed_ids]
    if logits.dim() != 2 or logits.shape[0] != len(claimed):
        raise ValueError(
            f"logits must be (T, V) with one row per claimed token; got shape {tuple(logits.shape)} "
            f"for {len(claimed)} claimed tokens"
        )
    if not params.greedy and params.seed is None:
        raise ValueError("Token-DiFR of a sampled (T > 0) claim needs its sampling seed")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    prompt_ids = [int(t) for t in prompt_ids]
    margins, refs = [], []
    for t, tok in enumerate(claimed):
        m, ref = _margin_row(logits[t], tok, params, prompt_ids, claimed[:t], sample_index, t)
        margins.append(m)
        refs.append(ref)
    return TokenDifrResult(
        margins=tuple(margins),
        claimed_ids=tuple(claimed),
        reference_ids=tuple(refs),
        clip=float(clip),
        score=clipped_mean(margins, clip),
    )


def verdict(result: TokenDifrResult, threshold: float) -> str:
    """`exact` (every token is the reference's), `consistent` (score <= threshold) or `inconsistent`."""
    if result.exact:
        return "exact"
    return "consistent" if result.score <= threshold else "inconsistent"
