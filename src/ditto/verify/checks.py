"""What a receipt claims that can be checked before any replay.

`precheck_receipt` needs no model: the content hash and signature, then the receipt's claims
against each other (a known numerics mode and determinism level, `exact` <=> `integer`, a sampling
record ditto can rebuild, no more output tokens than max_tokens). A failure is answered at once,
before a model is loaded.

`replay_plan` needs the verifying model: it decides whether that model can reproduce what the
receipt claims (same model and tokenizer digest, numerics, a determinism level whose promise covers
the replay), and how the replay is judged:

  * bitwise: the receipt claims `exact`, or `batch_invariant` and the replay runs on the same device
    type (with the receipt's thread count where this machine has the cores). Every token id, logprob
    and fingerprint must be reproduced bit for bit; any difference is `inconsistent`.
  * tolerance: a `fast` receipt, a `batch_invariant` one replayed on another device type, or a
    receipt made by another ditto version (kernels, and so bits, change between versions). Tokens
    by Token-DiFR, logprobs and fingerprints within calibrated tolerances (`ditto verify calibrate`).

A claim the verifier cannot replay (another model, numerics or a stronger determinism level than the
verifier runs) is `unverifiable` with the reason: never `exact`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ditto.verify.receipt import Receipt
from ditto.verify.verdict import Verdict

__all__ = ["ReplayPlan", "precheck_receipt", "replay_plan"]

_STRICT_LEVELS = ("batch_invariant", "exact")


def _known_numerics() -> set[str]:
    from ditto.numerics.base import list_modes

    return set(list_modes())


def _bad(receipt: Receipt, status: str, reason: str, *, field_name: str | None = None, claimed=None, **kw) -> Verdict:
    divergence = (
        None if field_name is None else {"field": field_name, "index": None, "claimed": claimed, "reference": None}
    )
    return Verdict(
        status,
        reason,
        id=receipt.content_hash or "",
        method="precheck",
        signed=receipt.signed,
        divergence=divergence,
        **kw,
    )


def precheck_receipt(receipt: Receipt, public_key=None) -> Verdict | None:
    """The model-free checks; a Verdict when the receipt fails one, else None (go on and replay it)."""
    from ditto.config import DETERMINISM_LEVELS, check_numerics
    from ditto.verify.build import params_from_record

    problems = receipt.check_integrity(public_key)
    if problems:
        v = _bad(receipt, "inconsistent", "tampered: " + "; ".join(problems), tampered=True)
        v.method = "integrity"
        return v
    if receipt.determinism not in DETERMINISM_LEVELS:
        return _bad(
            receipt,
            "unverifiable",
            f"determinism level {receipt.determinism!r} is unknown to this ditto "
            f"(it knows {', '.join(DETERMINISM_LEVELS)})",
            field_name="determinism",
            claimed=receipt.determinism,
        )
    known = _known_numerics()
    if receipt.numerics not in known:
        return _bad(
            receipt,
            "unverifiable",
            f"numerics {receipt.numerics!r} cannot be replayed by this ditto (it runs {', '.join(sorted(known))})",
            field_name="numerics",
            claimed=receipt.numerics,
        )
    try:
        check_numerics(receipt.numerics, receipt.determinism)
    except ValueError as e:
        return _bad(
            receipt,
            "inconsistent",
            f"the receipt contradicts itself: {e}",
            field_name="numerics",
            claimed=receipt.numerics,
        )
    try:
        params = params_from_record(receipt.sampling)
    except (TypeError, ValueError) as e:
        return _bad(
            receipt,
            "inconsistent",
            f"the sampling record is not valid: {e}",
            field_name="sampling",
            claimed=receipt.sampling,
        )
    if not params.greedy and params.seed is None:
        return _bad(
            receipt,
            "unverifiable",
            "a sampled (temperature > 0) receipt without its seed: the sampling noise cannot be rebuilt",
            field_name="sampling.seed",
        )
    n = len(receipt.output_token_ids)
    if n > params.max_tokens:
        return _bad(
            receipt,
            "inconsistent",
            f"{n} output tokens exceed the claimed max_tokens={params.max_tokens}",
            field_name="output_token_ids",
            claimed=n,
        )
    return None


@dataclass(frozen=True)
class ReplayPlan:
    """How one receipt is replayed on one verifier (see the module docstring)."""

    bitwise: bool  # every claimed value must be reproduced bit for bit
    threads: int | None = None  # torch threads for the replay (the receipt's, under batch_invariant)
    notes: tuple[str, ...] = field(default=())


def _device_type(device) -> str:
    return str(device or "cpu").split(":", 1)[0]


def replay_plan(llm, receipt: Receipt, model_digest: str) -> ReplayPlan | Verdict:
    """The plan for replaying `receipt` on `llm`, or an `unverifiable` Verdict saying why it cannot be."""
    cfg = llm.config
    mine = str(model_digest).removeprefix("sha256:")
    if receipt.model_digest.removeprefix("sha256:") != mine:
        return _bad(
            receipt,
            "unverifiable",
            f"the verifier runs a different model than the receipt's: receipt "
            f"model_digest {receipt.model_digest} ({receipt.model or '?'}), verifier sha256:{mine}; load the "
            "receipt's model (--model) to verify it",
            field_name="model_digest",
            claimed=receipt.model_digest,
        )
    tok = getattr(llm.tokenizer, "digest", None)
    if tok and receipt.tokenizer_digest.removeprefix("sha256:") != str(tok).removeprefix("sha256:"):
        return _bad(
            receipt,
            "unverifiable",
            f"the verifier's tokenizer differs from the receipt's: {receipt.tokenizer_digest} vs {tok}",
            field_name="tokenizer_digest",
            claimed=receipt.tokenizer_digest,
        )
    if receipt.numerics != cfg.numerics:
        return _bad(
            receipt,
            "unverifiable",
            f"the receipt claims numerics {receipt.numerics!r} but the verifier runs "
            f"{cfg.numerics!r}: the claim cannot be checked by this replay (ditto verify loads the receipt's "
            "numerics unless --numerics says otherwise)",
            field_name="numerics",
            claimed=receipt.numerics,
        )
    if receipt.determinism in _STRICT_LEVELS and cfg.determinism != receipt.determinism:
        return _bad(
            receipt,
            "unverifiable",
            f"the receipt claims determinism {receipt.determinism!r} but the "
            f"verifier runs {cfg.determinism!r}, which cannot reproduce its bits (ditto verify loads the "
            "receipt's level unless --determinism says otherwise)",
            field_name="determinism",
            claimed=receipt.determinism,
        )
    from ditto import __version__

    if receipt.ditto_version != __version__:  # kernels change between versions: their bits are not promised
        return ReplayPlan(
            bitwise=False,
            notes=(
                f"determinism {receipt.determinism!r} promises bits for one ditto version's kernels; the "
                f"receipt was made by ditto {receipt.ditto_version or '?'}, the verifier is ditto {__version__}: "
                "judged within tolerances (verify with the receipt's version for a bitwise check)",
            ),
        )
    if receipt.determinism == "exact":
        return ReplayPlan(bitwise=True)
    if receipt.determinism == "fast":
        return ReplayPlan(
            bitwise=False,
            notes=(
                "determinism 'fast' promises no bits: tokens are judged by "
                "Token-DiFR, logprobs and fingerprints within tolerances",
            ),
        )
    claimed_dev, my_dev = _device_type(receipt.hardware.get("device")), _device_type(getattr(llm, "device", "cpu"))
    if claimed_dev != my_dev:
        return ReplayPlan(
            bitwise=False,
            notes=(
                f"batch_invariant promises bits on one device type; the receipt was "
                f"made on {claimed_dev}, the replay runs on {my_dev}: judged within "
                "tolerances",
            ),
        )
    threads, notes = receipt.hardware.get("threads"), ()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        threads = None
    elif threads > (os.cpu_count() or 1):
        notes = (
            f"the receipt ran on {threads} threads; this machine has {os.cpu_count()} cores, so the replay runs "
            "on those (batch_invariant promises bits for a fixed thread count)",
        )
        threads = None
    return ReplayPlan(bitwise=True, threads=threads, notes=notes)
