"""Replay verification: check a receipt (or a receipt-less claim) against a trusted teacher-forced pass.

    verdict = verify_receipt(llm, Receipt.load("r.json"), threshold=None, public_key=None)
    verdict.status  ->  "exact" | "consistent" | "inconsistent"

Order of checks for a receipt:
  1. integrity: the content hash (and the signature, against `public_key` when given). Any edit
     after sealing -> `inconsistent` with `tampered=True` and the reason; nothing is replayed.
  2. identity: the receipt's model digest must be the verifier's (`llm.model_digest`), else
     `ModelMismatchError` (the verifier runs a different model: load the receipt's model). A
     tokenizer digest mismatch is the same error.
  3. ONE teacher-forced pass (`llm.score(prompt, claimed, keep_logits=True)`) gives the reference
     logits and final post-norm hidden states for every claimed token.
  4. Token-DiFR margins (ditto.verify.token_difr) with the receipt's sampling record and seed;
     Activation-DiFR distances (ditto.verify.activation_difr) when fingerprints are present.
  5. `exact` when every margin is 0 (every claimed token is what the reference sampler picks)
     and the fingerprints match bit for bit; `consistent` when the Token-DiFR score (mean of
     margins clipped at 0.5) is <= the token threshold and the mean fingerprint distance is <= the
     activation threshold; `inconsistent` otherwise. The first divergent token is reported with
     both candidates decoded.

Thresholds (a run is flagged when score > threshold):
  * DEFAULT_TOKEN_THRESHOLD = 0.02: mean clipped margin (clip 0.5, in units of tempered logits).
    Honest CPU runs in `batch_invariant`/`exact` mode score 0; honest `fast`-mode or
    cross-precision (bf16 vs fp32) reruns on SmolLM2 stay well below 0.01 (see
    benchmarks/verify_detection.py). 0.02 tolerates ~4% of tokens diverging by a full clip,
    so short dishonest runs are caught by the per-token evidence, long ones by the mean.
  * DEFAULT_ACTIVATION_THRESHOLD = 0.05: mean L2 distance of h·P fingerprints (P ~ N(0, 1/k)).
  Calibrate your own with `calibrate()` / `ditto verify calibrate --out thresholds.json`, which
  measures honest scores under other batch sizes and thread counts and stores the thresholds
  at a chosen false-positive rate; `Thresholds.load()` reads the file.

Modules: ditto.verify.verdict (Verdict, Thresholds, ModelMismatchError, the defaults),
ditto.verify.reference (the teacher-forced pass both replays share), ditto.verify.claim_replay
(verify_claims); this one replays receipts and calibrates thresholds, and re-exports the public names.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ditto.sampling import SamplingParams
from ditto.verify.activation_difr import activation_difr, fingerprints
from ditto.verify.build import model_digest, params_from_record, receipt_for
from ditto.verify.claim_replay import verify_claims
from ditto.verify.receipt import Receipt
from ditto.verify.reference import (
    _decide,
    _first_divergence,
    _mask_min_tokens,
    _reference_logprobs,
    _score_chunks,
)
from ditto.verify.stats import calibrate_threshold
from ditto.verify.token_difr import DEFAULT_CLIP, clipped_mean, token_difr
from ditto.verify.verdict import (
    DEFAULT_ACTIVATION_THRESHOLD,
    DEFAULT_LOGPROB_THRESHOLD,
    DEFAULT_TOKEN_THRESHOLD,
    THRESHOLDS_SCHEMA,
    ModelMismatchError,
    Thresholds,
    Verdict,
)

__all__ = [
    "DEFAULT_ACTIVATION_THRESHOLD",
    "DEFAULT_LOGPROB_THRESHOLD",
    "DEFAULT_TOKEN_THRESHOLD",
    "ModelMismatchError",
    "Thresholds",
    "Verdict",
    "calibrate",
    "verify_claims",
    "verify_receipt",
    "verify_receipts",
]


# ------------------------------------------------------------------------------------ receipts


def _precheck(llm, receipt: Receipt, public_key, check_model: bool) -> Verdict | None:
    problems = receipt.check_integrity(public_key)
    if problems:
        return Verdict(
            status="inconsistent",
            reason="tampered: " + "; ".join(problems),
            id=receipt.content_hash or "",
            method="integrity",
            tampered=True,
            signed=receipt.signed,
        )
    if check_model:
        mine = model_digest(llm)
        if receipt.model_digest.removeprefix("sha256:") != str(mine).removeprefix("sha256:"):
            raise ModelMismatchError(
                f"the verifier runs a different model than the receipt's: receipt model_digest "
                f"{receipt.model_digest} ({receipt.model or '?'}), verifier {mine} ({llm.loaded.path}); "
                f"load the receipt's model (--model) to verify it"
            )
        tok = getattr(llm.tokenizer, "digest", None)
        if (
            tok
            and receipt.tokenizer_digest
            and receipt.tokenizer_digest.removeprefix("sha256:") != str(tok).removeprefix("sha256:")
        ):
            raise ModelMismatchError(
                f"the verifier's tokenizer differs from the receipt's: {receipt.tokenizer_digest} vs {tok}"
            )
    return None


def verify_receipt(llm, receipt: Receipt, threshold=None, public_key=None, *, check_model: bool = True) -> Verdict:
    """Verify one receipt against `llm` (the trusted reference). See the module docstring."""
    return verify_receipts(llm, [receipt], threshold, public_key, check_model=check_model)[0]


def verify_receipts(
    llm, receipts: Sequence[Receipt], threshold=None, public_key=None, *, check_model: bool = True, chunk: int = 8
) -> list[Verdict]:
    """`verify_receipt` for many receipts; the teacher-forced passes are batched `chunk` at a time."""
    th = Thresholds.coerce(threshold)
    verdicts: list[Verdict | None] = [None] * len(receipts)
    todo = []
    for i, r in enumerate(receipts):
        early = _precheck(llm, r, public_key, check_model)
        if early is not None:
            verdicts[i] = early
        elif not r.output_token_ids:
            verdicts[i] = Verdict("exact", "no output tokens to verify", id=r.content_hash or "", signed=r.signed)
        else:
            todo.append(i)
    pairs = [(list(receipts[i].prompt_token_ids), list(receipts[i].output_token_ids)) for i in todo]
    for i, scored in zip(todo, _score_chunks(llm, pairs, chunk)):
        verdicts[i] = _verdict_from_scored(llm, receipts[i], scored, th)
    return verdicts  # type: ignore[return-value]


def _verdict_from_scored(llm, r: Receipt, scored, th: Thresholds) -> Verdict:
    notes = []
    params = params_from_record(r.sampling)
    if r.numerics != llm.config.numerics:
        notes.append(f"receipt numerics {r.numerics!r}, verifier runs {llm.config.numerics!r}")
    if r.determinism != llm.config.determinism:
        notes.append(f"receipt determinism {r.determinism!r}, verifier runs {llm.config.determinism!r}")
    n = len(r.output_token_ids)
    if r.finish_reason == "length" and n != params.max_tokens:
        notes.append(f"finish_reason 'length' with {n} tokens but max_tokens={params.max_tokens}")
    if n > params.max_tokens:
        notes.append(f"{n} output tokens exceed max_tokens={params.max_tokens}")
    logits = _mask_min_tokens(llm, scored.logits, params)
    res = token_difr(logits, r.output_token_ids, params, r.prompt_token_ids, r.sample_index, clip=th.clip)
    act = a = None
    if r.fingerprints is not None:
        ref = fingerprints(scored.hidden, r.fingerprint_k, seed=r.fingerprint_seed)
        a = activation_difr(r.fingerprints, ref)
        act = {
            "mean": a.mean,
            "max": a.max,
            "exact": a.exact,
            "threshold": th.activation,
            "first_above": a.first_above(0.0),
            "k": r.fingerprint_k,
        }
    lp_diff = None
    if r.output_logprobs is not None:
        d = np.abs(np.asarray(r.output_logprobs, dtype=np.float64) - _reference_logprobs(logits, r.output_token_ids))
        d = np.where(np.isnan(d), 0.0, d)
        lp_diff = float(d.max()) if d.size else 0.0
    status, reason = _decide(res, act, th, th.token)
    return Verdict(
        status=status,
        reason=reason,
        id=r.content_hash or "",
        method="greedy" if params.greedy else "token_difr",
        score=res.score,
        threshold=th.token,
        n_tokens=res.n_tokens,
        n_exact=res.n_exact,
        margins=res.margins,
        distances=a.distances if act is not None else (),
        first_divergence=_first_divergence(llm, res),
        activation=act,
        logprob_max_abs_diff=lp_diff,
        signed=r.signed,
        notes=notes,
    )


# --------------------------------------------------------------------------------- calibration


def calibrate(
    llm,
    prompts: Sequence,
    params_list: Sequence[SamplingParams] | SamplingParams,
    *,
    batch_sizes: Sequence[int] = (1, 4, 16),
    threads: Sequence[int | None] = (None, 1),
    fpr: float = 0.01,
    margin: float = 1.5,
    floor: float = 0.005,
    out: str | os.PathLike | None = None,
) -> dict:
    """Measure honest verification scores and derive thresholds; write them as JSON to `out`.

    Every prompt is generated honestly with `llm` under every (batch size, thread count) pair
    (batch size = how many prompts go into one `generate` call), then each generation is
    verified alone. The token threshold is `max(floor, margin * q)` where `q` is the honest
    score that flags at most `fpr` of honest runs (stats.calibrate_threshold); the activation
    threshold likewise over mean fingerprint distances (when params ask for fingerprints).
    """
    if isinstance(params_list, SamplingParams):
        params_list = [params_list] * len(prompts)
    params_list = [p if p.greedy else p.with_seed() for p in params_list]
    if len(params_list) != len(prompts):
        raise ValueError(f"{len(params_list)} params for {len(prompts)} prompts")
    saved_threads = torch.get_num_threads()
    token_scores, act_scores, conditions = [], [], []
    all_margins = []
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads or saved_threads)
            for bs in batch_sizes:
                receipts = []
                for lo in range(0, len(prompts), bs):
                    outs = llm.generate(list(prompts[lo : lo + bs]), list(params_list[lo : lo + bs]))
                    for o, p in zip(outs, params_list[lo : lo + bs]):
                        for comp in o.outputs:
                            receipts.append(receipt_for(llm, o, comp, p))
                torch.set_num_threads(saved_threads)
                vs = verify_receipts(llm, receipts, threshold=math.inf, chunk=1)
                torch.set_num_threads(n_threads or saved_threads)
                for v in vs:
                    token_scores.append(v.score if v.score is not None else 0.0)
                    all_margins.extend(m for m in v.margins if math.isfinite(m))
                    if v.activation is not None:
                        act_scores.append(v.activation["mean"])
                conditions.append(
                    {"threads": n_threads or saved_threads, "batch_size": bs, "runs": len(vs),
                     "exact": sum(v.status == "exact" for v in vs)}
                )  # fmt: skip
    finally:
        torch.set_num_threads(saved_threads)
    q_tok = calibrate_threshold(token_scores, fpr)
    doc = {
        "schema": THRESHOLDS_SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_digest": model_digest(llm),
        "numerics": llm.config.numerics,
        "determinism": llm.config.determinism,
        "fpr": fpr,
        "margin": margin,
        "floor": floor,
        "conditions": conditions,
        "token_difr": {
            "threshold": max(floor, margin * q_tok),
            "clip": DEFAULT_CLIP,
            "honest_quantile": q_tok,
            "honest_max": max(token_scores),
            "honest_mean": float(np.mean(token_scores)),
            "n_honest": len(token_scores),
            "honest_margin_p999": float(np.quantile(all_margins, 0.999)) if all_margins else 0.0,
        },
    }
    if act_scores:
        q_act = calibrate_threshold(act_scores, fpr)
        doc["activation_difr"] = {
            "threshold": max(floor, margin * q_act),
            "honest_quantile": q_act,
            "honest_max": max(act_scores),
            "n_honest": len(act_scores),
        }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


def clipped_score(margins: Sequence[float], clip: float = DEFAULT_CLIP, n_tokens: int | None = None) -> float:
    """Re-export of token_difr.clipped_mean (score from the first `n_tokens` margins)."""
    return clipped_mean(margins, clip, n_tokens)
