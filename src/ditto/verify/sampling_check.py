"""Were these tokens drawn at the claimed temperature? A seed-free check for other engines' samples.

Another engine's seed drives its own generator, so Token-DiFR cannot rebuild its noise. What can
be checked without it is how surprising the claimed tokens are under the distribution the claim
says they were drawn from (the reference logits after ditto's penalties, temperature and
top-k / top-p / min-p). At each position t with that distribution p_t:

    s_t = -log p_t(claimed_t)        E[s_t] = H(p_t)        Var[s_t] = sum p log^2 p - H(p_t)^2

and over the run z_surprise = sum_t (s_t - H_t) / sqrt(sum_t Var_t), about N(0, 1) for honest draws
(the central limit theorem; positions where p_t is one-hot add nothing). Tokens drawn hotter than
claimed push it up. Colder draws (or greedy ones claimed as sampled) show better in how often the
claimed token is p_t's most likely one: z_argmax = (#argmax - sum_t max p_t) / sqrt(sum_t max p_t
(1 - max p_t)). The run's z is whichever of the two is larger in size; it is flagged when |z| >
DEFAULT_Z (4: a few in 10,000 honest runs of many tokens, both tests together). Numerical noise
moves z little: this checks the sampler, not the numerics (the logprob comparison does that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ditto.sampling import SamplingParams, processed_scores

DEFAULT_Z = 4.0


@dataclass(frozen=True)
class SurpriseResult:
    z: float  # z_surprise or z_argmax, whichever is larger in size; 0.0 when no position was uncertain
    z_surprise: float
    z_argmax: float
    n_tokens: int  # positions that count (the claimed token kept, p_t not one-hot)
    mean_surprise: float  # nats per counted token
    mean_entropy: float

    def flagged(self, z_max: float = DEFAULT_Z) -> bool:
        return abs(self.z) > z_max


def surprise_z(
    logits: torch.Tensor, claimed_ids: Sequence[int], params: SamplingParams, prompt_ids: Sequence[int] = ()
) -> SurpriseResult:
    """The z statistic above for `claimed_ids` under reference `logits` (T, V) and `params` (T > 0).

    Positions whose claimed token the claimed filters remove are skipped (the kept-set check
    reports those)."""
    if params.greedy:
        raise ValueError("the surprise check is for sampled (T > 0) claims")
    claimed = [int(t) for t in claimed_ids]
    prompt = [int(t) for t in prompt_ids]
    total = var = s_sum = h_sum = top_hits = top_p = top_var = 0.0
    n = 0
    for t, tok in enumerate(claimed):
        scaled, keep = processed_scores(logits[t], params, prompt, claimed[:t])
        if not 0 <= tok < scaled.numel() or not bool(keep[tok]):
            continue
        logp = torch.log_softmax(scaled.masked_fill(~keep, -math.inf), dim=-1)
        p = logp.exp()
        finite = torch.where(keep, logp, torch.zeros_like(logp))
        h = float(-(p * finite).sum())
        v = float((p * finite * finite).sum()) - h * h
        if v <= 1e-12:
            continue
        pmax = float(p.max())
        top_hits += float(p[tok] == pmax)
        top_p += pmax
        top_var += pmax * (1 - pmax)
        s = float(-logp[tok])
        total += s - h
        var += v
        s_sum += s
        h_sum += h
        n += 1
    z_s = total / math.sqrt(var) if var > 0 else 0.0
    z_a = (top_hits - top_p) / math.sqrt(top_var) if top_var > 1e-12 else 0.0
    z = z_s if abs(z_s) >= abs(z_a) else z_a
    return SurpriseResult(z, z_s, z_a, n, s_sum / n if n else 0.0, h_sum / n if n else 0.0)
