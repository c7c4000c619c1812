"""Sampling: parameters, counter-based Gumbel noise and logit processing in one documented order.

Processing order (recorded in every output as PROCESSING_ORDER):
  1. repetition penalty (HF style: positive logits / p, negative logits * p) over prompt + output ids
  2. frequency and presence penalties (OpenAI style) over output ids
  3. temperature (T = 0 means greedy: argmax of the penalised logits)
  4. top-k, 5. top-p (nucleus, on the tempered distribution), 6. min-p (relative to the top prob)
  7. Gumbel-max: argmax over kept tokens of  logits / T + g(seed, sample_index, token_index, vocab_id)

The noise g is a pure function of its four integer coordinates (a SplitMix64 hash turned into a
Gumbel variate), so batching cannot change it and a verifier can recompute it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# SamplingParams, its defaults and checks live in ditto.sampling_params; re-exported here
from ditto.sampling_params import DEFAULTS, PROCESSING_ORDER, SamplingParams  # noqa: F401

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int (mod 2^64)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _C1) & _MASK64
    x = ((x ^ (x >> 27)) * _C2) & _MASK64
    return x ^ (x >> 31)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding unsigned 64-bit values."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic = arithmetic mod 2^64)."""
    x = (x ^ _srl(x, 30)) * _signed(_C1)
    x = (x ^ _srl(x, 27)) * _signed(_C2)
    return x ^ _srl(x, 31)


def row_key(seed: int, sample_index: int, token_index: int) -> int:
    """64-bit key of one sampling step, from its three integer coordinates."""
    k = _mix_int(seed * _GOLDEN + 1)
    k = _mix_int(k ^ (sample_index * _GOLDEN + 2))
    return _mix_int(k ^ (token_index * _GOLDEN + 3))


def noise_bits_at(key: int, ids: torch.Tensor) -> torch.Tensor:
    """The 64-bit hash (int64) of vocab ids `ids` (0-based) under a row key: mix((id + 1) * golden + key)."""
    return _mix((ids + 1) * _signed(_GOLDEN) + _signed(key))


def _all_bits(key: int, vocab_size: int) -> torch.Tensor:
    """noise_bits_at for every vocab id: in one C pass when a compiler is there, else with torch."""
    from ditto.numerics.kernels import noise_c  # lazy: ditto.numerics imports this module

    fast = noise_c.bits(key, vocab_size)
    return fast if fast is not None else noise_bits_at(key, torch.arange(vocab_size, dtype=torch.int64))


def noise_bits(seed: int, sample_index: int, token_index: int, vocab_size: int) -> torch.Tensor:
    """Uniform 64-bit hash per vocab id (int64 tensor of shape (V,))."""
    return _all_bits(row_key(seed, sample_index, token_index), vocab_size)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) variates (float64) from 64-bit hashes: g = -log(-log(u)), u = (bits >>> 11 + 0.5) / 2^53.

    Elementwise: a token's value does not depend on which other tokens are computed with it."""
    u = (_srl(bits, 11).double() + 0.5) * 2.0**-53
    return -torch.log(-torch.log(u))


def gumbel_noise(seed: int, sample_index: int, token_index: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise g of shape (V,), float64: g = -log(-log(u)), u uniform in (0, 1)."""
    return gumbel_from_bits(noise_bits(seed, sample_index, token_index, vocab_size))


_PROBE = 64  # tokens (highest scaled logits) whose noise is always computed in gumbel_argmax


def gumbel_argmax(scaled: torch.Tensor, keep: torch.Tensor, seed: int, sample_index: int, token_index: int) -> int:
    """Step 7: argmax over kept tokens of scaled + gumbel_noise(seed, sample_index, token_index, V).

    The same token as computing all V noises (ties go to the lowest id, as torch.argmax), with the
    noise computed only for tokens that can still win. The noise of the `_PROBE` best-scaled kept
    tokens sets a value L that the winner reaches; every other token has scaled <= s (the probe's
    lowest), so it can win only if its noise exceeds t = L - s, i.e. only if its uniform
    u >= exp(-exp(-t)): an integer threshold on its hash, taken with a margin so rounding can only add
    candidates, never drop the winner. The hash of the rest is scanned in C where a compiler exists.
    """
    from ditto.numerics.kernels import noise_c  # lazy: ditto.numerics imports this module

    vocab = scaled.numel()
    key = row_key(seed, sample_index, token_index)
    masked = scaled.masked_fill(~keep, float("-inf"))
    top = torch.topk(masked, min(_PROBE, vocab))  # values descending
    probe_best = float((top.values + gumbel_from_bits(noise_bits_at(key, top.indices))).max())
    s_rest = float(top.values[-1])
    if s_rest == float("-inf") or top.indices.numel() == vocab:
        cand = top.indices.sort().values  # every kept token is in the probe; ascending ids for ties
    else:
        t = probe_best - s_rest - 1e-6 * max(1.0, abs(probe_best), abs(s_rest))  # an outside token needs g > t
        u_min = math.exp(-math.exp(-t)) if t > -30.0 else 0.0
        m_min = max(0, math.floor(u_min * 2.0**53) - 1)  # u = (m + 0.5) / 2^53 < u_min for every m < m_min
        outside = noise_c.select(key, vocab, m_min)
        if outside is None:
            outside = torch.nonzero(_srl(_all_bits(key, vocab), 11) >= m_min).flatten()
        cand = torch.cat([top.indices, outside]).unique()  # sorted ascending: ties resolve as in a full argmax
    vals = masked[cand] + gumbel_from_bits(noise_bits_at(key, cand))
    return int(cand[torch.argmax(vals)])


def mask_min_tokens(
    logits: torch.Tensor, params: SamplingParams, stop_ids: Iterable[int], start: int = 0
) -> torch.Tensor:
    """No stop before params.min_tokens: logits (N, V), row r scoring generated token `start + r`.

    Rows whose token index is below min_tokens get -inf at every stop id (`stop_ids`: the model's
    EOS / stop tokens, together with params.stop_token_ids; ids outside the vocabulary are ignored),
    unless params.ignore_eos. Returns `logits` itself when nothing is masked, else a masked copy.
    """
    rows = min(params.min_tokens - start, logits.shape[0])
    if params.ignore_eos or rows <= 0:
        return logits
    stop = sorted({int(s) for s in (*stop_ids, *params.stop_token_ids) if 0 <= s < logits.shape[-1]})
    if not stop:
        return logits
    logits = logits.clone()
    logits[:rows, stop] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids) -> torch.Tensor:
    """Steps 1-2 on one row of logits (V,). Returns a new float32 tensor."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        if len(seen):
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and len(output_ids):
        ids, counts = torch.tensor(list(output_ids), dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    return logits


def kept_mask(scaled: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Steps 4-6: boolean mask (V,) of tokens that survive top-k, top-p and min-p.

    `scaled` are the penalised logits divided by the temperature.
    """
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if params.top_k and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        keep &= scaled >= kth
    if params.top_p < 1.0 or params.min_p > 0.0:
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True, stable=True)
            before = torch.cumsum(sorted_p, 0) - sorted_p  # mass strictly before each token
            drop_sorted = before >= params.top_p
            drop_sorted[0] = False
            drop = torch.zeros_like(keep)
            drop[order] = drop_sorted
            keep &= ~drop
        if params.min_p > 0.0:
            keep &= probs >= params.min_p * probs.max()
    return keep


def processed_scores(
    logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-6 for one row: (scaled logits (V,) float64, kept mask (V,)). For T = 0 scaled = penalised."""
    penalised = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return penalised.double(), torch.ones_like(penalised, dtype=torch.bool)
    scaled = penalised.double() / params.temperature
    return scaled, kept_mask(scaled, params)


def sample_row(
    logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids, sample_index: int, token_index: int
) -> int:
    """Choose the next token for one sequence (the whole of steps 1-7)."""
    scaled, keep = processed_scores(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return int(torch.argmax(scaled))
    assert params.seed is not None, "seed must be resolved before sampling"
    return gumbel_argmax(scaled, keep, params.seed, sample_index, token_index)
