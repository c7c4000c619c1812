"""Integer references that only the tests use: a whole W8A8 linear and Gumbel-max sampling built
from ditto.numerics.kernels.integer_ops (the engine fuses these chains: IntLinear, IntegerSampler)."""

from __future__ import annotations

import torch

from ditto.numerics.kernels import integer_ops as iops


def linear_int(
    q: torch.Tensor,
    a16: torch.Tensor,
    sa: torch.Tensor,
    w: torch.Tensor,
    m: torch.Tensor,
    e: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear with per-token activation and per-channel weight/output scales, int64 out.

    q (T, K) int8 with row scale a16 * 2^sa / 127 (from quantize_rows), w (N, K) int8.
    (m, e) per output channel (N,) is dyadic(s_x * s_w[n] / (127 * s_out[n])), mbits <= 18,
    so out[t, n] = round(acc * a16 * m / 2^(e - sa)) in units of s_out[n]; bias in those units.
    """
    acc = iops.int8_matmul(q.reshape(-1, q.shape[-1]), w).long().reshape(*q.shape[:-1], w.shape[0])
    out = iops.requantise(acc * a16, m, e - sa)
    return out if bias is None else out + bias


def gumbel_argmax_int(
    logits: torch.Tensor,
    logit_scale: float,
    temperature: float,
    seed: int,
    sample_index: int,
    token_index: int,
    keep: torch.Tensor | None = None,
) -> int:
    """Sample argmax(logit/T + g) exactly: argmax over logit_int * M + (g_Q24 << e); T = 0 is argmax.

    logits: (V,) ints (|logit| < 2^31) standing for logit_int * logit_scale. keep: bool mask.
    The scores are int64 (|logit * M| < 2^55, |g << e| < 2^61). Ties go to the lowest id.
    """
    logits = logits.long()
    if temperature == 0.0:
        score = logits
    else:
        m, e = iops.temperature_multiplier(logit_scale, temperature)
        if iops._CHECKS:
            iops._check(iops._absmax(logits) * m < (1 << 62), "gumbel_argmax_int logit * M >= 2^62")
        g = iops.gumbel_noise_int(seed, sample_index, token_index, logits.numel()).to(logits.device)
        score = logits * m + (g << e)
    if keep is not None:
        score = score.masked_fill(~keep, -iops.I64_MAX)
    return int(torch.argmax(score))
