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
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditto.sampling import SamplingParams
from ditto.verify.activation_difr import activation_difr, fingerprints
from ditto.verify.build import model_digest, params_from_record, receipt_for
from ditto.verify.receipt import Receipt
from ditto.verify.stats import calibrate_threshold
from ditto.verify.token_difr import DEFAULT_CLIP, TokenDifrResult, clipped_mean, token_difr

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

DEFAULT_TOKEN_THRESHOLD = 0.02
DEFAULT_ACTIVATION_THRESHOLD = 0.05
DEFAULT_LOGPROB_THRESHOLD = 0.05  # mean |claimed - reference| log-probability (nats), logprob-only claims
THRESHOLDS_SCHEMA = "ditto.thresholds/v1"


class ModelMismatchError(ValueError):
    """The receipt was produced by a different model (or tokenizer) than the verifier runs."""


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds; a run is flagged when its score is strictly above the threshold."""

    token: float = DEFAULT_TOKEN_THRESHOLD  # Token-DiFR clipped-mean margin
    activation: float = DEFAULT_ACTIVATION_THRESHOLD  # mean fingerprint L2 distance
    logprob: float = DEFAULT_LOGPROB_THRESHOLD  # mean |Δ logprob| for logprob-only claims
    clip: float = DEFAULT_CLIP
    source: str = "default"
    meta: dict = field(default_factory=dict, compare=False)

    @classmethod
    def coerce(cls, value) -> Thresholds:
        if value is None:
            return cls()
        if isinstance(value, Thresholds):
            return value
        if isinstance(value, int | float):
            return cls(token=float(value), source="given")
        if isinstance(value, str | os.PathLike):
            return cls.load(value)
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise TypeError(f"threshold must be a number, Thresholds, dict or file path, got {type(value).__name__}")

    @classmethod
    def from_dict(cls, doc: dict, source: str = "dict") -> Thresholds:
        tok = doc.get("token_difr", {})
        act = doc.get("activation_difr", {})
        return cls(
            token=float(tok.get("threshold", DEFAULT_TOKEN_THRESHOLD)),
            activation=float(act.get("threshold", DEFAULT_ACTIVATION_THRESHOLD)),
            logprob=float(doc.get("logprob", {}).get("threshold", DEFAULT_LOGPROB_THRESHOLD)),
            clip=float(tok.get("clip", DEFAULT_CLIP)),
            source=source,
            meta={k: v for k, v in doc.items() if k not in ("token_difr", "activation_difr", "logprob")},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Thresholds:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if doc.get("schema") != THRESHOLDS_SCHEMA:
            raise ValueError(f"{path}: not a ditto threshold file (schema {doc.get('schema')!r})")
        return cls.from_dict(doc, source=str(path))


@dataclass
class Verdict:
    """The outcome of verifying one receipt or claim."""

    status: str  # exact | consistent | inconsistent | unverifiable
    reason: str
    id: str = ""
    method: str = "token_difr"  # token_difr | greedy | logprobs | likelihood | integrity
    score: float | None = None  # Token-DiFR clipped-mean margin (or the method's score)
    threshold: float | None = None
    n_tokens: int = 0
    n_exact: int = 0
    margins: tuple[float, ...] = ()  # Token-DiFR margin per claimed token
    distances: tuple[float, ...] = ()  # Activation-DiFR L2 distance per token (when fingerprints exist)
    first_divergence: dict | None = None  # index, claimed/reference id and text, margin
    activation: dict | None = None  # mean, max, exact, threshold, first_above
    logprob_max_abs_diff: float | None = None
    tampered: bool = False
    signed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("exact", "consistent")

    def to_dict(self, margins: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not margins:
            d.pop("margins")
            d.pop("distances")
        return _jsonable(d)

    def summary(self) -> str:
        parts = [f"{self.status.upper()}"]
        if self.score is not None:
            parts.append(f"score={self.score:.4g} (threshold {self.threshold:.4g}, {self.method})")
        if self.n_tokens:
            parts.append(f"{self.n_exact}/{self.n_tokens} tokens exact")
        if self.activation is not None:
            parts.append(f"fingerprint mean dist={self.activation['mean']:.3g}")
        out = "  ".join(parts) + f"\n  {self.reason}"
        fd = self.first_divergence
        if fd:
            out += (
                f"\n  first divergence at output token {fd['index']}: claimed {fd['claimed_id']} "
                f"{fd['claimed_text']!r} vs reference {fd['reference_id']} {fd['reference_text']!r} "
                f"(margin {fd['margin']:.4g})"
            )
        for note in self.notes:
            out += f"\n  note: {note}"
        return out


# ------------------------------------------------------------------------------------- helpers


def _jsonable(x):
    """Plain JSON types with non-finite floats as the strings "inf" / "-inf" / "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def _decode(llm, tok: int | None) -> str:
    if tok is None:
        return ""
    try:
        return llm.tokenizer.decode([int(tok)], skip_special_tokens=False)
    except TypeError:
        return llm.decode([int(tok)])
    except Exception:  # noqa: BLE001 - an out-of-vocabulary id
        return f"<id {tok}>"


def _mask_min_tokens(llm, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The engine forbids stop tokens before min_tokens; mirror that on the reference logits."""
    if not params.min_tokens or params.ignore_eos:
        return logits
    stop = sorted(set(getattr(llm.engine, "stop_ids", ())) | set(params.stop_token_ids))
    stop = [s for s in stop if 0 <= s < logits.shape[1]]
    if not stop:
        return logits
    logits = logits.clone()
    n = min(params.min_tokens, logits.shape[0])
    logits[:n, stop] = float("-inf")
    return logits


def _first_divergence(llm, res: TokenDifrResult) -> dict | None:
    i = res.first_divergence
    if i is None:
        return None
    return {
        "index": i,
        "claimed_id": res.claimed_ids[i],
        "claimed_text": _decode(llm, res.claimed_ids[i]),
        "reference_id": res.reference_ids[i],
        "reference_text": _decode(llm, res.reference_ids[i]),
        "margin": res.margins[i],
    }


def _score_chunks(llm, pairs: list[tuple[list[int], list[int]]], chunk: int = 8):
    """llm.score_batch over (prompt ids, claimed ids) pairs in chunks (logits are C x V floats each)."""
    for lo in range(0, len(pairs), chunk):
        yield from llm.score_batch(pairs[lo : lo + chunk], keep_logits=True)


def _decide(res: TokenDifrResult, act: dict | None, th: Thresholds, token_threshold: float) -> tuple[str, str]:
    fp_exact = act is None or act["exact"]
    if res.exact and fp_exact:
        what = "every claimed token is exactly what the reference sampler picks"
        return "exact", what + (" and every fingerprint matches bit for bit" if act is not None else "")
    bad = []
    if res.score > token_threshold:
        bad.append(f"Token-DiFR score {res.score:.4g} > threshold {token_threshold:.4g}")
    if act is not None and act["mean"] > th.activation:
        bad.append(f"mean fingerprint distance {act['mean']:.4g} > threshold {th.activation:.4g}")
    if bad:
        return "inconsistent", "; ".join(bad)
    why = f"{res.n_tokens - res.n_exact} of {res.n_tokens} tokens differ from the reference sampler's"
    if act is not None and not act["exact"]:
        why += f"; fingerprints differ (mean distance {act['mean']:.3g})"
    return "consistent", why + ", within the thresholds (honest numerical noise)"


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
        ref_lp = torch.log_softmax(logits.float(), dim=-1)
        ref_lp = ref_lp[torch.arange(n), torch.tensor(r.output_token_ids).clamp(max=ref_lp.shape[1] - 1)]
        d = np.abs(np.asarray(r.output_logprobs, dtype=np.float64) - ref_lp.double().numpy())
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


# -------------------------------------------------------------------------------------- claims


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
    ref_lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(out).clamp(max=ref_lp.shape[1] - 1)
    ref = ref_lp[torch.arange(len(out)), idx].double().numpy()
    first = None
    if filtered:
        t = filtered[0]
        top = int(torch.argmax(logits[t]))
        first = {
            "index": t, "claimed_id": out[t], "claimed_text": _decode(llm, out[t]), "reference_id": top,
            "reference_text": _decode(llm, top), "margin": math.inf,
        }  # fmt: skip
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
