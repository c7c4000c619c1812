"""Replay of receipt-less claims (ditto.verify.claims.Claim) against a trusted teacher-forced pass."""

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
from ditto.verify.token_difr import token_difr
from ditto.verify.verdict import Thresholds, Verdict


def _claim_ids(llm, claim) -> tuple[list[int], list[int], list[str]]:
    notes = []
    if claim.prompt_token_ids is not None:
        prompt = list(claim.prompt_token_ids)
    elif claim.messages is not None:
        prompt = llm.encode(llm.chat_prompt(list(claim.messages)), add_special_tokens=False)
    else:
        prompt = llm.encode(claim.prompt)
    if claim.output_token_ids is not None:
        out = list(claim.output_token_ids)
    else:
        out = llm.encode(claim.output_text or "", add_special_tokens=False)
        notes.append("output re-tokenized from text (token boundaries may differ from the original)")
    return prompt, out, notes


def verify_claims(llm, claims, threshold=None, *, chunk: int = 8) -> list[Verdict]:
    """Verify receipt-less claims (ditto.verify.claims.Claim) against `llm`.

    greedy claims: rank/margin check (margin = max logit - claimed logit; 0 = the argmax);
    T > 0 with a seed: Token-DiFR; only logprobs: mean |claimed - reference logprob| against the
    logprob threshold (plus the kept-set check); nothing else: every claimed token must survive
    the claim's top-k / top-p / min-p filters (`unverifiable` when there are none).
    """
    th = Thresholds.coerce(threshold)
    prepared, verdicts = [], [None] * len(claims)
    for i, c in enumerate(claims):
        prompt, out, notes = _claim_ids(llm, c)
        if c.unsupported:
            notes.append(f"sampling options ditto cannot replay: {', '.join(c.unsupported)}")
        if not out:
            verdicts[i] = Verdict("unverifiable", "the claim has no output tokens", id=c.id, method=c.method)
            continue
        prepared.append((i, prompt, out, notes))
    pairs = [(p, o) for _, p, o, _ in prepared]
    for (i, prompt, out, notes), scored in zip(prepared, _score_chunks(llm, pairs, chunk)):
        verdicts[i] = _claim_verdict(llm, claims[i], prompt, out, notes, scored, th)
    return verdicts  # type: ignore[return-value]


def _claim_verdict(llm, c, prompt, out, notes, scored, th: Thresholds) -> Verdict:
    params = c.params
    method = c.method
    logits = _mask_min_tokens(llm, scored.logits, params)
    if method in ("greedy", "token_difr"):
        res = token_difr(logits, out, params, prompt, c.sample_index, clip=th.clip)
        status, reason = _decide(res, None, th, th.token)
        if method == "greedy":
            ranks = [
                int((logits[t] > logits[t, tok]).sum()) if tok < logits.shape[1] else -1 for t, tok in enumerate(out)
            ]
            notes.append(f"{sum(r == 0 for r in ranks)}/{len(ranks)} claimed tokens are the reference argmax")
        return Verdict(
            status, reason, id=c.id, method=method, score=res.score, threshold=th.token, n_tokens=res.n_tokens,
            n_exact=res.n_exact, margins=res.margins, first_divergence=_first_divergence(llm, res), notes=notes,
        )  # fmt: skip
    # no seed: check the kept set with seed-free params (a fixed dummy seed; only the mask matters)
    probe = params.replace(seed=0)
    kept_margins = token_difr(logits, out, probe, prompt, c.sample_index, clip=th.clip).margins
    filtered = [t for t, m in enumerate(kept_margins) if math.isinf(m)]
    ref = _reference_logprobs(logits, out)
    first = None
    if filtered:
        t = filtered[0]
        top = int(torch.argmax(logits[t]))
        first = _divergence(llm, t, out[t], top, math.inf)
    common = dict(id=c.id, method=method, n_tokens=len(out), first_divergence=first, notes=notes)
    if method == "logprobs":
        claimed = np.asarray([math.nan if x is None else x for x in c.logprobs], dtype=np.float64)
        if claimed.size != len(out):
            notes.append(f"{claimed.size} logprobs for {len(out)} (re-tokenized) output tokens; compared the overlap")
        m = min(claimed.size, len(out))
        d = np.abs(claimed[:m] - ref[:m])
        d = d[np.isfinite(d)]
        score = float(d.mean()) if d.size else 0.0
        if filtered:
            return Verdict(
                "inconsistent", f"{len(filtered)} claimed tokens are outside the claimed top-k/top-p/min-p set",
                score=score, threshold=th.logprob, logprob_max_abs_diff=float(d.max()) if d.size else 0.0, **common,
            )  # fmt: skip
        status = "consistent" if score <= th.logprob else "inconsistent"
        return Verdict(
            status, f"mean |claimed - reference logprob| = {score:.4g} (threshold {th.logprob:.4g})",
            score=score, threshold=th.logprob, logprob_max_abs_diff=float(d.max()) if d.size else 0.0, **common,
        )  # fmt: skip
    # likelihood only
    nll = float(-ref.mean())
    if filtered:
        return Verdict(
            "inconsistent", f"{len(filtered)} claimed tokens are outside the claimed top-k/top-p/min-p set",
            score=nll, **common,
        )  # fmt: skip
    if params.top_k or params.top_p < 1.0 or params.min_p > 0.0:
        return Verdict(
            "consistent", "weak check (no seed, no logprobs): every token survives the claimed filters",
            score=nll, **common,
        )  # fmt: skip
    return Verdict(
        "unverifiable", f"no seed, logprobs or filters to check; mean reference NLL {nll:.3f} nats/token",
        score=nll, **common,
    )  # fmt: skip
