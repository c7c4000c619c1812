"""Replay of receipt-less claims (ditto.verify.claims.Claim) against a trusted teacher-forced pass.

Each claim gets every check its fields allow, and is inconsistent when any one fails:
  tokens    greedy (T = 0): rank/margin check, the Token-DiFR margin max logit - claimed logit;
            T > 0 with ditto's seed: Token-DiFR (the claimed tokens against ditto's noise);
            T > 0 otherwise: each claimed token must survive the claimed top-k / top-p / min-p, and
            the surprise z-test (ditto.verify.sampling_check) asks whether the tokens were drawn
            at the claimed temperature;
  logprobs  when the claim has them: mean |claimed - reference log p(token)| against
            Thresholds.logprob (reference logprobs are of the raw logits, before temperature, as
            ditto, vLLM and llama.cpp report them).
`exact` when the tokens are exactly what the reference sampler picks and any claimed logprob is
bit-identical; `unverifiable` when nothing could be checked (no output, or T > 0 with no seed, no
logprobs and no token whose draw was uncertain).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ditto.verify.reference import (
    _decide,
    _divergence,
    _first_divergence,
    _mask_min_tokens,
    _reference_logprobs,
    _score_chunks,
)
from ditto.verify.retokenize import ClaimIds, claim_ids
from ditto.verify.sampling_check import DEFAULT_Z, surprise_z
from ditto.verify.token_difr import token_difr
from ditto.verify.verdict import Thresholds, Verdict


def verify_claims(llm, claims, threshold=None, *, chunk: int = 8) -> list[Verdict]:
    """One Verdict per claim (ditto.verify.claims.Claim), in order; see the module docstring. Default
    thresholds take the logprob threshold measured for claims against `llm`'s numerics (Thresholds.for_claims)."""
    th = Thresholds.coerce(threshold).for_claims(llm.config.numerics)
    prepared, verdicts = [], [None] * len(claims)
    for i, c in enumerate(claims):
        ids = claim_ids(llm, c)
        if c.unsupported:
            ids.notes.append(f"sampling options ditto cannot replay: {', '.join(c.unsupported)}")
        if c.params.seed is not None and c.sampler != "ditto" and not c.params.greedy:
            ids.notes.append(
                f"seed {c.params.seed} is {c.sampler}'s generator, not ditto's: Token-DiFR cannot replay it"
            )
        if not ids.output:
            verdicts[i] = Verdict("unverifiable", "the claim has no output tokens", id=c.id, method=c.method)
            continue
        prepared.append((i, ids))
    pairs = [(ids.prompt, ids.output) for _, ids in prepared]
    for (i, ids), scored in zip(prepared, _score_chunks(llm, pairs, chunk)):
        verdicts[i] = _claim_verdict(llm, claims[i], ids, scored.logits, th)
    return verdicts  # type: ignore[return-value]


def _field(name: str, compared: int, different: int, flagged: list[int], max_diff: float, score, tolerance) -> dict:
    """A per-check entry of Verdict.fields (the shape receipt replays use)."""
    return {
        "field": name,
        "compared": compared,
        "different": different,
        "flagged": len(flagged),
        "first_flagged": flagged[0] if flagged else None,
        "max_abs_diff": max_diff,
        "score": score,
        "tolerance": tolerance,
    }


def _logprob_check(c, ref: np.ndarray, th: Thresholds, notes: list[str]) -> tuple[bool, bool, str, dict]:
    """(flagged, identical, reason, field) of the claimed logprobs against the reference."""
    claimed = np.asarray([math.nan if x is None else x for x in c.logprobs], dtype=np.float64)
    m = min(claimed.size, ref.size)
    if claimed.size != ref.size:
        notes.append(f"{claimed.size} claimed logprobs for {ref.size} output tokens; compared the first {m}")
    gap = np.abs(claimed[:m] - ref[:m])
    both_inf = np.isinf(claimed[:m]) & np.isinf(ref[:m]) & (claimed[:m] == ref[:m])
    gap = np.where(both_inf, 0.0, gap)
    finite = gap[np.isfinite(gap)]
    score = float(finite.mean()) if finite.size else 0.0
    flagged_bool = score > th.logprob
    over = [int(t) for t in np.flatnonzero(gap > th.logprob)] if flagged_bool else []
    different = int((gap != 0).sum())
    mx = float(finite.max()) if finite.size else 0.0
    reason = f"mean |claimed - reference logprob| {score:.4g} (threshold {th.logprob:.4g}, largest {mx:.3g})"
    field = _field("output_logprobs", m, different, over, mx, score, th.logprob)
    return flagged_bool, different == 0 and m == ref.size, reason, field


def _claim_verdict(llm, c, ids: ClaimIds, logits: torch.Tensor, th: Thresholds) -> Verdict:
    params, method, out, notes = c.params, c.method, ids.output, list(ids.notes)
    logits = _mask_min_tokens(llm, logits, params)
    fields, bad, good = [], [], []
    first, score, threshold, n_exact, margins, exact = None, None, None, 0, (), False
    if method in ("greedy", "token_difr"):
        res = token_difr(logits, out, params, ids.prompt, c.sample_index, clip=th.clip)
        status, why = _decide(res, None, th, th.token)
        (bad if status == "inconsistent" else good).append(why)
        exact, score, threshold, n_exact, margins = status == "exact", res.score, th.token, res.n_exact, res.margins
        first = _first_divergence(llm, res)
        diff = [t for t, m in enumerate(res.margins) if m > 0]
        finite = [m for m in res.margins if math.isfinite(m)]
        flagged = diff if status == "inconsistent" else []
        fields.append(
            _field("output_token_ids", len(out), len(diff), flagged, max(finite, default=0.0), res.score, th.token)
        )
        if method == "greedy":
            notes.append(f"{res.n_exact}/{res.n_tokens} claimed tokens are the reference argmax")
    else:
        # no replayable seed: the claimed filters (a fixed dummy seed; only the kept mask matters) ...
        kept = token_difr(logits, out, params.replace(seed=0), ids.prompt, c.sample_index, clip=th.clip).margins
        filtered = [t for t, m in enumerate(kept) if math.isinf(m)]
        if filtered:
            t = filtered[0]
            first = _divergence(llm, t, out[t], int(torch.argmax(logits[t])), math.inf)
            bad.append(f"{len(filtered)} claimed tokens are outside the claimed top-k/top-p/min-p set")
        # ... and the temperature the tokens look drawn at
        sur = surprise_z(logits, out, params, ids.prompt)
        fields.append(_field("sampling", sur.n_tokens, 0, [0] if sur.flagged() else [], 0.0, sur.z, DEFAULT_Z))
        what = (
            f"sampler z = {sur.z:+.3g} over {sur.n_tokens} uncertain tokens (|z| <= {DEFAULT_Z:g} for draws at "
            f"T={params.temperature:g}; surprise z {sur.z_surprise:+.3g}: {sur.mean_surprise:.3g} vs expected "
            f"{sur.mean_entropy:.3g} nats/token; argmax-rate z {sur.z_argmax:+.3g})"
        )
        if sur.n_tokens:
            (bad if sur.flagged() else good).append(what)
        score, threshold = abs(sur.z), DEFAULT_Z
    ref = _reference_logprobs(logits, out)
    lp_identical = True
    if c.logprobs is not None and ids.roundtrip is False:
        notes.append("claimed logprobs not compared: the re-tokenised output does not line up with the server's tokens")
    elif c.logprobs is not None:
        flag, lp_identical, why, field = _logprob_check(c, ref, th, notes)
        fields.append(field)
        (bad if flag else good).append(why)
        if method == "logprobs":
            score, threshold = field["score"], th.logprob
    common = dict(
        id=c.id, method=method, score=score, threshold=threshold, n_tokens=len(out), n_exact=n_exact,
        margins=tuple(margins), first_divergence=first, notes=notes, fields=fields,
    )  # fmt: skip
    if fields and fields[-1]["field"] == "output_logprobs":
        common["logprob_max_abs_diff"] = fields[-1]["max_abs_diff"]
    if bad:
        return Verdict("inconsistent", "; ".join(bad), **common)
    if not good:
        return Verdict("unverifiable", "no replayable seed, no logprobs and no uncertain token to check", **common)
    if exact and lp_identical:
        return Verdict("exact", "; ".join(good), **common)
    if method == "likelihood":
        good.append("the sampler only: without a replayable seed or logprobs the numerics are not checked")
    return Verdict("consistent", "; ".join(good), **common)
