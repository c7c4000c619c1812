"""Activation-DiFR: compact fingerprints of the final post-norm hidden state, h·P.

P (d x k) is Gaussian N(0, 1/k) from a public seed and is bit-identical on every machine:
  * uniforms from ditto's counter-based SplitMix64 hash (`ditto.sampling.noise_bits`) under a
    domain tag of their own, so a fingerprint seed equal to a sampling seed shares no noise;
  * Box-Muller in float64 with Python's scalar `math` functions (torch/numpy vectorised
    transcendentals differ between ISAs), z = sqrt(-2 ln u1) cos(2 pi u2), |z| < 8.7;
  * z rounded to a fixed-point grid of 2^-19: P = round(z * 2^19) / 2^19 / sqrt(k).
The fingerprint is computed exactly in integers, so it is bit-identical on any machine too:
per token, with 2^e the smallest power of two above max|h|, hq = round(h * 2^(24-e))
(|hq| <= 2^24) and acc = hq @ round(z * 2^19) computed exactly (|acc| < 2^63 for d <= 2^15;
as two float64 matmuls whose partial sums are integers below 2^53, so no summation order
matters), fingerprint = acc * 2^(e-24-19) / sqrt(k).
This equals h·P up to rounding h to 24 significant bits of its largest entry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ditto.sampling import noise_bits

DEFAULT_FINGERPRINT_SEED = 0x44495454_4F465000  # "DITTOFP\0", public
_DOMAIN = 0x41435444_49465231  # "ACTDIFR1": sample-index slot reserved for projections
_P_BITS = 19  # fixed-point fraction bits of the projection entries
_H_BITS = 24  # significant bits kept of each token's hidden state (relative to its max)
_MASK64 = (1 << 64) - 1


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2.0 ** n as float64, built from the exponent bits (exact; n must be in the normal range)."""
    n = n.to(torch.int64)
    if bool(((n < -1022) | (n > 1023)).any()):
        raise ValueError("hidden-state magnitude out of range for an exact fingerprint")
    return ((n + 1023) << 52).view(torch.float64)


@functools.lru_cache(maxsize=8)
def _projection_ints(d: int, k: int, seed: int) -> torch.Tensor:
    """round(z * 2^19) for z ~ N(0, 1): int64 (d, k), entry (i, j) from hash index i * k + j."""
    n = d * k
    b1 = noise_bits(seed, _DOMAIN, 0, n).tolist()
    b2 = noise_bits(seed, _DOMAIN, 1, n).tolist()
    out = []
    two_pi, scale = 2.0 * math.pi, float(1 << _P_BITS)
    for x1, x2 in zip(b1, b2):
        u1 = ((((x1 & _MASK64) >> 12) << 1) | 1) * 2.0**-53  # exact, in (0, 1)
        u2 = ((((x2 & _MASK64) >> 12) << 1) | 1) * 2.0**-53
        z = math.sqrt(-2.0 * math.log(u1)) * math.cos(two_pi * u2)
        out.append(round(z * scale))  # round half to even, exact integer
    return torch.tensor(out, dtype=torch.int64).reshape(d, k)


def projection_matrix(d: int, k: int, seed: int = DEFAULT_FINGERPRINT_SEED) -> torch.Tensor:
    """P (d, k) float64 with entries ~ N(0, 1/k); the same on every machine and every call."""
    if d < 1 or k < 1:
        raise ValueError(f"projection needs d >= 1 and k >= 1, got d={d}, k={k}")
    if d > 1 << 15:
        raise ValueError(f"hidden size {d} > 32768 would overflow the exact int64 fingerprint")
    if not 0 <= seed < 1 << 64:
        raise ValueError("fingerprint seed must be in [0, 2^64)")
    return _projection_ints(d, k, seed).double() * 2.0**-_P_BITS / math.sqrt(k)


def fingerprints(hidden: torch.Tensor, k: int, seed: int = DEFAULT_FINGERPRINT_SEED) -> torch.Tensor:
    """Fingerprints (T, k) float64 of final post-norm hidden states `hidden` (T, d), bit-exact."""
    h = torch.as_tensor(hidden).detach().to("cpu", torch.float32)
    if h.dim() == 1:
        h = h.unsqueeze(0)  # (d,) -> (1, d)
    if h.dim() != 2:
        raise ValueError(f"hidden states must be (T, d), got shape {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError("hidden states contain inf or NaN")
    d = h.shape[1]
    projection_matrix(d, k, seed)  # validates the arguments
    pi = _projection_ints(d, k, seed)  # (d, k) int64
    h64 = h.double()  # exact
    _, e = torch.frexp(h64.abs().amax(dim=1))  # (T,): max|h| < 2^e (e = 0 for an all-zero row)
    hq = torch.round(h64 * _pow2(_H_BITS - e).unsqueeze(1)).to(torch.int64)  # (T, d), exact scaling
    # hq = hi * 2^12 + lo with |hi|, |lo| <= 2^12: every partial sum of hi @ pi and lo @ pi is an
    # integer below 2^(12 + 23.2 + 15) < 2^53, so float64 BLAS computes both exactly in any order.
    hi = torch.div(hq, 1 << 12, rounding_mode="floor")  # (T, d)
    lo = hq - hi * (1 << 12)  # (T, d), in [0, 4096)
    pf = pi.double()  # (d, k), exact
    acc = (hi.double() @ pf).to(torch.int64) * (1 << 12) + (lo.double() @ pf).to(torch.int64)  # (T, k) exact
    return acc.double() * _pow2(e - _H_BITS - _P_BITS).unsqueeze(1) / math.sqrt(k)  # (T, k)


def fingerprint_distances(claimed, recomputed) -> torch.Tensor:
    """L2 distance per token (T,) float64 between claimed and recomputed fingerprints (T, k)."""
    a = torch.as_tensor(np.asarray(claimed, dtype=np.float64))
    b = torch.as_tensor(recomputed).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"fingerprint shapes differ: claimed {tuple(a.shape)} vs recomputed {tuple(b.shape)}")
    if a.dim() != 2:
        raise ValueError(f"fingerprints must be (T, k), got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        return torch.where(torch.isfinite(a).all(dim=1), (a - b).norm(dim=1), torch.tensor(math.inf))
    return (a - b).norm(dim=1)


@dataclass(frozen=True)
class ActivationDifrResult:
    distances: tuple[float, ...]  # per token
    mean: float
    max: float

    @property
    def exact(self) -> bool:
        return all(x == 0.0 for x in self.distances)

    def first_above(self, threshold: float) -> int | None:
        return next((i for i, x in enumerate(self.distances) if x > threshold), None)


def activation_difr(
    claimed: Sequence[Sequence[float]] | torch.Tensor, recomputed: torch.Tensor
) -> ActivationDifrResult:
    """Per-token L2 distances between claimed and recomputed fingerprints; score = mean (and max)."""
    dist = fingerprint_distances(claimed, recomputed)
    if dist.numel() == 0:
        return ActivationDifrResult((), 0.0, 0.0)
    return ActivationDifrResult(tuple(dist.tolist()), float(dist.mean()), float(dist.max()))
