"""Replay verification: check a receipt (or a receipt-less claim) against a trusted teacher-forced pass.

    verdict = verify_receipt(llm, Receipt.load("r.json"), threshold=None, public_key=None)
    verdict.status  ->  "exact" | "consistent" | "inconsistent" | "unverifiable"

Order of checks for a receipt:
  1. model-free (ditto.verify.checks.precheck_receipt): the content hash and the signature (against
     `public_key` when given; an edit after sealing -> `inconsistent`, `tampered=True`), then the
     receipt's claims against each other (known numerics and level, exact <=> integer, a sampling
     record that rebuilds, no more tokens than max_tokens). Nothing is replayed when one fails.
  2. replay plan (checks.replay_plan): the verifier must run the receipt's model and tokenizer digest,
     numerics and (for batch_invariant / exact) determinism level, else `unverifiable` with the
     reason. `exact` and same-device `batch_invariant` receipts are judged bit for bit (replayed on
     the receipt's thread count); `fast` ones, and batch_invariant ones from another device type,
     within tolerances.
  3. ONE teacher-forced pass (`llm.score_batch(..., keep_logits=True)`) gives the reference logits
     and final post-norm hidden states for every claimed token.
  4. each claimed field against the replay (ditto.verify.compare): token ids by their Token-DiFR
     margin with the receipt's sampling record and seed, logprobs as the engine computes them,
     Activation-DiFR fingerprints.
  5. `exact` when every claimed value is reproduced bit for bit; `inconsistent` when any differs under
     bitwise judgement, or one is above its tolerance; `consistent` when the differences are within
     the tolerances. The verdict names the first differing field and position with both values
     (`divergence`), counts every field's differences (`fields`) and decodes the first divergent token.

Thresholds (a run is flagged when score > threshold):
  * DEFAULT_TOKEN_THRESHOLD = 0.02: mean clipped margin (clip 0.5, in units of tempered logits).
    Honest CPU runs in `batch_invariant`/`exact` mode score 0; honest `fast`-mode or
    cross-precision (bf16 vs fp32) reruns on SmolLM2 stay well below 0.01 (see
    benchmarks/verify_detection.py). 0.02 tolerates ~4% of tokens diverging by a full clip,
    so short dishonest runs are caught by the per-token evidence, long ones by the mean.
  * DEFAULT_ACTIVATION_THRESHOLD = 0.05: mean L2 distance of h·P fingerprints (P ~ N(0, 1/k)).
  * DEFAULT_LOGPROB_TOLERANCE = 0.05: per-token |claimed - reference| logprob (nats), tolerance replays.
  Calibrate your own with `calibrate()` / `ditto verify calibrate --out thresholds.json`, which
  measures honest scores under other batch sizes and thread counts and stores the thresholds
  at a chosen false-positive rate; `Thresholds.load()` reads the file.

Modules: ditto.verify.verdict (Verdict, Thresholds, the defaults), ditto.verify.checks, ditto.verify.compare,
ditto.verify.reference (the teacher-forced pass both replays share), ditto.verify.claim_replay
(verify_claims); this one replays receipts and calibrates thresholds, and re-exports the public names.
"""

from __future__ import annotations

import contextlib
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
from ditto.verify.checks import ReplayPlan, precheck_receipt, replay_plan
from ditto.verify.claim_replay import verify_claims
from ditto.verify.compare import compare_fields, first_difference, reference_logprobs
from ditto.verify.receipt import Receipt
from ditto.verify.reference import _first_divergence, _mask_min_tokens, _score_chunks
from ditto.verify.stats import calibrate_threshold
from ditto.verify.token_difr import DEFAULT_CLIP, token_difr
from ditto.verify.verdict import (
    DEFAULT_ACTIVATION_THRESHOLD,
    DEFAULT_LOGPROB_THRESHOLD,
    DEFAULT_LOGPROB_TOLERANCE,
    DEFAULT_TOKEN_THRESHOLD,
    THRESHOLDS_SCHEMA,
    Thresholds,
    Verdict,
)

__all__ = [
    "DEFAULT_ACTIVATION_THRESHOLD",
    "DEFAULT_LOGPROB_THRESHOLD",
    "DEFAULT_LOGPROB_TOLERANCE",
    "DEFAULT_TOKEN_THRESHOLD",
    "Thresholds",
    "Verdict",
    "calibrate",
    "precheck_receipt",
    "verify_claims",
    "verify_receipt",
    "verify_receipts",
]


# ------------------------------------------------------------------------------------ receipts


def verify_receipt(llm, receipt: Receipt, threshold=None, public_key=None) -> Verdict:
    """Verify one receipt against `llm` (the trusted reference). See the module docstring."""
    return verify_receipts(llm, [receipt], threshold, public_key)[0]


def verify_receipts(
    llm, receipts: Sequence[Receipt], threshold=None, public_key=None, *, chunk: int = 8
) -> list[Verdict]:
    """`verify_receipt` for many receipts; the teacher-forced passes are batched `chunk` at a time."""
    th = Thresholds.coerce(threshold)
    verdicts: list[Verdict | None] = [None] * len(receipts)
    plans: dict[int, ReplayPlan] = {}
    for i, r in enumerate(receipts):
        early = precheck_receipt(r, public_key)
        if early is None:
            early = replay_plan(llm, r, model_digest(llm))
        if isinstance(early, Verdict):
            verdicts[i] = early
        elif not r.output_token_ids:
            how = "bitwise" if early.bitwise else "tolerance"
            verdicts[i] = Verdict(
                "exact", "no output tokens to verify", id=r.content_hash or "", signed=r.signed, comparison=how
            )
        else:
            plans[i] = early
    for threads in sorted({p.threads or 0 for p in plans.values()}):
        todo = [i for i, p in plans.items() if (p.threads or 0) == threads]
        pairs = [(list(receipts[i].prompt_token_ids), list(receipts[i].output_token_ids)) for i in todo]
        with _torch_threads(threads or None):
            scored_all = list(_score_chunks(llm, pairs, chunk))
        for i, scored in zip(todo, scored_all):
            verdicts[i] = _verdict_from_scored(llm, receipts[i], scored, th, plans[i])
    return verdicts  # type: ignore[return-value]


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run the replay on `n` torch threads (the receipt's), then restore the caller's count."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _verdict_from_scored(llm, r: Receipt, scored, th: Thresholds, plan: ReplayPlan) -> Verdict:
    notes = list(plan.notes)
    params = params_from_record(r.sampling)
    n = len(r.output_token_ids)
    if r.finish_reason == "length" and n != params.max_tokens:
        notes.append(f"finish_reason 'length' with {n} tokens but max_tokens={params.max_tokens} (the context end?)")
    if not plan.bitwise:
        th = th.for_numerics(r.numerics)
        notes.extend(_threshold_notes(r, th))
    logits = _mask_min_tokens(llm, scored.logits, params)
    res = token_difr(logits, r.output_token_ids, params, r.prompt_token_ids, r.sample_index, clip=th.clip)
    ref_lp = reference_logprobs(logits, r.output_token_ids) if r.output_logprobs is not None else None
    ref_fp = None
    if r.fingerprints is not None:
        ref_fp = fingerprints(scored.hidden, r.fingerprint_k, seed=r.fingerprint_seed).double().numpy()  # (T, k)
    reports = compare_fields(res, r.output_logprobs, ref_lp, r.fingerprints, ref_fp, bitwise=plan.bitwise, th=th)
    act = a = None
    if ref_fp is not None:
        a = activation_difr(r.fingerprints, torch.from_numpy(ref_fp))
        act = {"mean": a.mean, "max": a.max, "exact": a.exact, "threshold": th.activation,
               "first_above": a.first_above(0.0), "k": r.fingerprint_k}  # fmt: skip
    status, reason = _judge(reports, plan)
    lp = next((rep for rep in reports if rep.field == "output_logprobs"), None)
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
        distances=a.distances if act else (),
        first_divergence=_first_divergence(llm, res),
        activation=act,
        logprob_max_abs_diff=lp.max_abs_diff if lp is not None else None,
        signed=r.signed,
        notes=notes,
        comparison="bitwise" if plan.bitwise else "tolerance",
        divergence=first_difference(reports),
        fields=[rep.to_dict() for rep in reports],
    )


def _threshold_notes(r: Receipt, th: Thresholds) -> list[str]:
    """Where the tolerances come from, and whether they were measured for this receipt's model and mode."""
    if th.source == "default" or th.source.startswith("ditto's measured defaults"):
        return [
            f"tolerances: {th.source} (Token-DiFR {th.token:g}, logprob {th.logprob_abs:g} nats, fingerprint "
            f"{th.activation:g}); `ditto verify calibrate` measures them for your model and mode"
        ]
    notes = []
    for key, mine in (("model_digest", r.model_digest), ("numerics", r.numerics), ("determinism", r.determinism)):
        theirs = th.meta.get(key)
        if theirs is not None and theirs != mine:
            notes.append(f"the thresholds were calibrated for {key} {theirs}, the receipt claims {mine}")
    return notes


def _judge(reports, plan: ReplayPlan) -> tuple[str, str]:
    """exact (every field bit for bit) / inconsistent (a flagged field) / consistent (differences within tolerance)."""
    if not any(rep.n_different for rep in reports):
        names = ", ".join(rep.field for rep in reports)
        return "exact", f"every claimed value ({names}) is reproduced bit for bit"
    flagged = [rep for rep in reports if rep.flagged]
    if flagged:
        if plan.bitwise:
            what = "; ".join(f"{rep.field}: {rep.n_different} of {rep.n_compared} differ" for rep in flagged)
            return "inconsistent", f"the receipt's level promises bit-exact replay, and {what}"
        what = "; ".join(_above(rep) for rep in flagged)
        return "inconsistent", what
    what = "; ".join(f"{rep.field}: {rep.n_different} of {rep.n_compared} differ" for rep in reports if rep.n_different)
    return "consistent", f"{what}, within the tolerances (numerical noise of a level that promises no bits)"


def _above(rep) -> str:
    if rep.field == "output_logprobs":
        return (f"output_logprobs: {len(rep.flagged)} of {rep.n_compared} differ by more than the tolerance "
                f"{rep.tolerance:.4g} (largest {rep.max_abs_diff:.4g})")  # fmt: skip
    what = "Token-DiFR score" if rep.field == "output_token_ids" else "mean fingerprint distance"
    return f"{what} {rep.score:.4g} > threshold {rep.tolerance:.4g}"


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
    threshold likewise over mean fingerprint distances (when params ask for fingerprints), and the
    logprob tolerance over each run's largest |claimed - replayed| logprob.
    """
    if isinstance(params_list, SamplingParams):
        params_list = [params_list] * len(prompts)
    params_list = [p if p.greedy else p.with_seed() for p in params_list]
    if len(params_list) != len(prompts):
        raise ValueError(f"{len(params_list)} params for {len(prompts)} prompts")
    token_scores, act_scores, lp_diffs, conditions = [], [], [], []
    unbounded = Thresholds(token=math.inf, activation=math.inf, logprob=math.inf, logprob_abs=math.inf)
    all_margins = []
    for n_threads in threads:
        for bs in batch_sizes:
            with _torch_threads(n_threads):  # honest generations on n_threads; verified on the caller's
                used = torch.get_num_threads()
                receipts = []
                for lo in range(0, len(prompts), bs):
                    outs = llm.generate(list(prompts[lo : lo + bs]), list(params_list[lo : lo + bs]))
                    for o, p in zip(outs, params_list[lo : lo + bs]):
                        receipts.extend(receipt_for(llm, o, comp, p) for comp in o.outputs)
            vs = verify_receipts(llm, receipts, threshold=unbounded, chunk=1)
            for v in vs:
                token_scores.append(v.score if v.score is not None else 0.0)
                all_margins.extend(m for m in v.margins if math.isfinite(m))
                if v.activation is not None:
                    act_scores.append(v.activation["mean"])
                if v.logprob_max_abs_diff is not None:
                    lp_diffs.append(v.logprob_max_abs_diff)
            conditions.append(
                {"threads": used, "batch_size": bs, "runs": len(vs), "exact": sum(v.status == "exact" for v in vs)}
            )
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
    for key, scores in (("logprob_abs", lp_diffs), ("activation_difr", act_scores)):
        if scores:
            q = calibrate_threshold(scores, fpr)
            doc[key] = {"threshold": max(floor, margin * q), "honest_quantile": q, "honest_max": max(scores),
                        "n_honest": len(scores)}  # fmt: skip
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc
