"""Token-DiFR margins, detection statistics and Activation-DiFR projections (no model needed)."""

from __future__ import annotations

import hashlib
import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditto.sampling import SamplingParams, processed_scores, sample_row
from ditto.verify.activation_difr import (
    DEFAULT_FINGERPRINT_SEED,
    activation_difr,
    fingerprint_distances,
    fingerprints,
    projection_matrix,
)
from ditto.verify.stats import auc, calibrate_threshold, tpr_at_fpr
from ditto.verify.token_difr import (
    DEFAULT_CLIP,
    clip_from_honest,
    clipped_mean,
    score_curve,
    token_difr,
    verdict,
)

V, T = 300, 48
PROMPT = [3, 5, 7, 11, 5]

PARAMS = {
    "greedy": SamplingParams(temperature=0.0),
    "greedy_penalised": SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
    "t0.7_filters": SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, seed=11),
    "t1_penalties": SamplingParams(
        temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.4, seed=12
    ),
    "t1.5_plain": SamplingParams(temperature=1.5, seed=2**62 + 5),
    "t0.3_top_p": SamplingParams(temperature=0.3, top_p=0.5, seed=0),
}


def random_logits(seed: int, t: int = T, v: int = V) -> torch.Tensor:
    return torch.randn(t, v, generator=torch.Generator().manual_seed(seed)) * 3.0  # (T, V) float32


def generate(logits: torch.Tensor, params: SamplingParams, sample_index: int = 0) -> list[int]:
    """A generation loop with ditto's own sampler over fixed per-step logits."""
    out: list[int] = []
    for t in range(logits.shape[0]):
        out.append(sample_row(logits[t], params, PROMPT, out, sample_index, t))
    return out


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("sample_index", [0, 3])
def test_honest_generation_has_zero_margins(name, sample_index):
    params = PARAMS[name]
    logits = random_logits(1)
    claimed = generate(logits, params, sample_index)
    res = token_difr(logits, claimed, params, PROMPT, sample_index)
    assert res.margins == (0.0,) * T
    assert res.exact and res.score == 0.0 and res.first_divergence is None
    assert res.reference_ids == tuple(claimed) and res.n_exact == T
    assert res.first_divergence is None
    assert verdict(res, threshold=0.0) == "exact"


def test_wrong_token_has_positive_margin_and_is_located():
    params = PARAMS["t0.7_filters"]
    logits = random_logits(2)
    claimed = generate(logits, params)
    _, keep = processed_scores(logits[5], params, PROMPT, claimed[:5])
    alternative = next(v for v in range(V) if keep[v] and v != claimed[5])
    tampered = claimed[:5] + [alternative] + claimed[6:]
    res = token_difr(logits, tampered, params, PROMPT)
    assert 0 < res.margins[5] < math.inf
    assert all(m == 0.0 for i, m in enumerate(res.margins) if i != 5)  # no penalties: other rows unchanged
    assert res.first_divergence == 5 and res.claimed_ids[5] == alternative and res.reference_ids[5] == claimed[5]
    assert res.score == pytest.approx(min(res.margins[5], DEFAULT_CLIP) / T)
    assert verdict(res, threshold=1.0) == "consistent" and verdict(res, threshold=0.0) == "inconsistent"


def test_filtered_token_has_infinite_margin():
    params = PARAMS["t0.7_filters"]
    logits = random_logits(3)
    claimed = generate(logits, params)
    _, keep = processed_scores(logits[0], params, PROMPT, [])
    filtered = int(torch.nonzero(~keep)[0])
    res = token_difr(logits, [filtered] + claimed[1:], params, PROMPT, clip=2.0)
    assert res.margins[0] == math.inf and res.first_divergence == 0
    assert res.score == pytest.approx(2.0 / T)
    out_of_vocab = token_difr(logits[:1], [V + 10], params, PROMPT)
    assert out_of_vocab.margins == (math.inf,)


def test_greedy_margin_is_logit_gap():
    params = PARAMS["greedy"]
    logits = random_logits(4, t=3)
    claimed = [int(torch.argmin(logits[0])), int(torch.argmax(logits[1])), 0]
    res = token_difr(logits, claimed, params, PROMPT)
    assert res.margins[0] == pytest.approx(float(logits[0].max() - logits[0].min()))
    assert res.margins[1] == 0.0
    assert res.margins[2] == pytest.approx(float(logits[2].max() - logits[2, 0]))


@pytest.mark.parametrize("wrong", ["seed", "sample_index", "temperature", "top_p"])
def test_wrong_sampling_configuration_scores_high(wrong):
    params = PARAMS["t1.5_plain"]
    logits = random_logits(5, t=200) / 3.0  # a flatter distribution
    claimed = generate(logits, params)
    verifier_params, sample_index = params, 0
    if wrong == "seed":
        verifier_params = params.replace(seed=params.seed + 1)
    elif wrong == "sample_index":
        sample_index = 1
    elif wrong == "temperature":
        verifier_params = params.replace(temperature=0.5)
    else:
        verifier_params = params.replace(top_p=0.3)
    res = token_difr(logits, claimed, verifier_params, PROMPT, sample_index)
    honest = token_difr(logits, claimed, params, PROMPT)
    assert honest.score == 0.0
    assert res.score > 0.2 and res.n_exact < 0.7 * res.n_tokens


def test_token_difr_argument_checks():
    logits = random_logits(6, t=4)
    with pytest.raises(ValueError, match="one row per claimed token"):
        token_difr(logits, [1, 2, 3], PARAMS["greedy"])
    with pytest.raises(ValueError, match="seed"):
        token_difr(logits, [1, 2, 3, 4], SamplingParams(temperature=1.0))


def test_clipped_mean_curve_and_clip_from_honest():
    margins = [0.0, 0.1, math.inf, 2.0]
    assert clipped_mean(margins, clip=1.0) == pytest.approx((0.0 + 0.1 + 1.0 + 1.0) / 4)
    assert clipped_mean(margins, clip=1.0, n_tokens=2) == pytest.approx(0.05)
    assert clipped_mean([], clip=1.0) == 0.0
    assert score_curve(margins, ns=(1, 3, 10), clip=1.0) == {1: 0.0, 3: pytest.approx(1.1 / 3)}
    honest = [0.0] * 900 + list(np.linspace(0.001, 0.1, 100)) + [math.inf]
    assert 0.09 < clip_from_honest(honest) <= 0.1
    assert clip_from_honest([0.0, 0.0]) == DEFAULT_CLIP


# --------------------------------------------------------------------------------- stats


def brute_force_auc(neg, pos) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_pair_count(seed):
    rng = np.random.default_rng(seed)
    neg = np.round(rng.normal(0, 1, 60), 1).tolist() + [math.inf]  # rounding makes ties
    pos = np.round(rng.normal(0.7, 1, 45), 1).tolist() + [math.inf, math.inf]
    assert auc(neg, pos) == pytest.approx(brute_force_auc(neg, pos), abs=1e-12)
    assert auc([0, 0], [1, 2]) == 1.0 and auc([1, 2], [0, 0]) == 0.0 and auc([1], [1]) == 0.5


def test_calibrate_threshold_and_tpr():
    honest = list(range(100))  # 0..99
    thr = calibrate_threshold(honest, fpr=0.01)
    assert thr == 98 and sum(s > thr for s in honest) == 1
    assert calibrate_threshold(honest, fpr=0.0) == 99
    assert calibrate_threshold(honest, fpr=0.05) == 94
    assert calibrate_threshold([0.0] * 50 + [1.0], fpr=0.01) == 1.0
    assert tpr_at_fpr(honest, [98.5, 99.5, 10, 200], fpr=0.01) == 0.75
    with pytest.raises(ValueError):
        calibrate_threshold([float("nan")])


# ------------------------------------------------------------------------ Activation-DiFR


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


_SUBPROCESS = (
    "import hashlib, torch; torch.set_num_threads(1)\n"
    "from ditto.verify.activation_difr import projection_matrix, fingerprints\n"
    "h = torch.linspace(-3, 5, 17 * 96).reshape(17, 96).sin() * 7\n"
    "print(hashlib.sha256(projection_matrix(96, 16, 99).numpy().tobytes()).hexdigest())\n"
    "print(hashlib.sha256(fingerprints(h, 16, 99).numpy().tobytes()).hexdigest())\n"
)


def test_projection_and_fingerprints_identical_across_calls_and_processes():
    p1 = projection_matrix(96, 16, 99)
    assert torch.equal(p1, projection_matrix(96, 16, 99)) and p1.dtype == torch.float64
    assert not torch.equal(p1, projection_matrix(96, 16, 100))
    h = torch.linspace(-3, 5, 17 * 96).reshape(17, 96).sin() * 7
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [_digest(p1), _digest(fingerprints(h, 16, 99))]


def test_projection_is_pinned():
    """P is part of the receipt format: it must never change (on any machine)."""
    p = projection_matrix(64, 8, DEFAULT_FINGERPRINT_SEED)
    assert _digest(p)[:16] == PINNED_P_DIGEST


PINNED_P_DIGEST = "81096f554ac346d1"  # sha256 of P (64, 8) float64 little-endian bytes


def test_projection_moments_are_standard_normal():
    z = (projection_matrix(1024, 32, 5) * math.sqrt(32)).flatten().numpy()  # 32768 draws
    assert abs(z.mean()) < 0.03 and abs(z.var() - 1) < 0.03
    assert abs(((z - z.mean()) ** 3).mean()) < 0.1
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 0.15
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.03


def test_fingerprints_match_float_projection_and_are_exact():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(20, 256, generator=g) * torch.logspace(-3, 2, 20).unsqueeze(1)  # (T, d), many scales
    h[3] = 0.0
    fp = fingerprints(h, 16, seed=9)
    ref = h.double() @ projection_matrix(256, 16, seed=9)
    assert fp.shape == (20, 16) and fp.dtype == torch.float64
    assert torch.allclose(fp, ref, rtol=0, atol=1e-6 * float(ref.abs().max(dim=1, keepdim=True).values.max()))
    rel = (fp - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
    assert float(rel[torch.arange(20) != 3].max()) < 1e-6
    assert torch.equal(fp[3], torch.zeros(16, dtype=torch.float64))
    assert torch.equal(fingerprints(h * 4, 16, seed=9), fp * 4)  # power-of-two scaling is exact
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = fingerprints(h, 16, seed=9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, fp)
    assert torch.equal(fingerprints(h.to(torch.bfloat16), 16, 9), fingerprints(h.to(torch.bfloat16).float(), 16, 9))


def test_fingerprint_distances():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(10, 128, generator=g)
    fp = fingerprints(h, 8)
    same = activation_difr(fp.tolist(), fingerprints(h.clone(), 8))
    assert same.exact and same.mean == 0.0 and same.max == 0.0 and same.first_above(0.0) is None
    h2 = h.clone()
    h2[6] += 0.1 * torch.randn(128, generator=g)
    res = activation_difr(fp, fingerprints(h2, 8))
    assert res.distances[6] > 0 and all(d == 0 for i, d in enumerate(res.distances) if i != 6)
    assert res.max == res.distances[6] and res.mean == pytest.approx(res.distances[6] / 10)
    assert res.first_above(0.0) == 6
    d = fingerprint_distances(fp, fp + 3.0)
    assert torch.allclose(d, torch.full((10,), 3.0 * math.sqrt(8), dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes differ"):
        fingerprint_distances(fp[:, :4], fp)
