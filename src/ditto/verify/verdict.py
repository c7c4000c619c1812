"""What verification returns: the Verdict of one receipt or claim, and the Thresholds it is judged by
(see ditto.verify.replay for how the thresholds were chosen)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ditto.verify.token_difr import DEFAULT_CLIP

DEFAULT_TOKEN_THRESHOLD = 0.02
DEFAULT_ACTIVATION_THRESHOLD = 0.05
DEFAULT_LOGPROB_THRESHOLD = 0.05  # mean |claimed - reference| log-probability (nats), logprob-only claims
# ... against a reference whose honest cross-engine gap was measured (benchmarks/verify_claims_peers.py,
# results in benchmarks/results/verify_claims_peers/): vLLM fp32 vs ditto fp32 gave per-response means of
# 2e-6..5e-6 nats (largest token 3e-5); vLLM bf16 0.013..0.042, llama.cpp Q4_1 0.030..0.057. 1e-3 sits
# 200x above the honest fp32 gap and 13x below the closest lower-precision response.
CLAIM_LOGPROB_THRESHOLDS = {"fp32": 1e-3}
DEFAULT_LOGPROB_TOLERANCE = 0.05  # per-token |claimed - reference| log-probability (nats) of a receipt replayed
# within tolerances (`fast`); honest fast reruns on SmolLM2 stay below it (see replay.calibrate)
THRESHOLDS_SCHEMA = "ditto.thresholds/v1"


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds; a run is flagged when its score is strictly above the threshold."""

    token: float = DEFAULT_TOKEN_THRESHOLD  # Token-DiFR clipped-mean margin
    activation: float = DEFAULT_ACTIVATION_THRESHOLD  # mean fingerprint L2 distance
    logprob: float = DEFAULT_LOGPROB_THRESHOLD  # mean |Δ logprob| for logprob-only claims
    logprob_abs: float = DEFAULT_LOGPROB_TOLERANCE  # per-token |Δ logprob| of receipts judged within tolerances
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
            logprob_abs=float(doc.get("logprob_abs", {}).get("threshold", DEFAULT_LOGPROB_TOLERANCE)),
            clip=float(tok.get("clip", DEFAULT_CLIP)),
            source=source,
            meta={k: v for k, v in doc.items() if k not in ("token_difr", "activation_difr", "logprob", "logprob_abs")},
        )

    def for_numerics(self, numerics: str) -> Thresholds:
        """The default thresholds replaced by those measured for `numerics` (ditto/verify/tolerances.json,
        made by benchmarks/verify_tolerances.py); thresholds that were given or calibrated stay as they are."""
        if self.source != "default":
            return self
        measured = _measured_tolerances().get(numerics)
        if measured is None:
            return self
        return dataclasses.replace(self, **measured, source=f"ditto's measured defaults for numerics {numerics}")

    def for_claims(self, numerics: str) -> Thresholds:
        """The default logprob threshold replaced by the one measured for claims judged against a `numerics`
        reference (CLAIM_LOGPROB_THRESHOLDS); thresholds that were given or calibrated stay as they are."""
        if self.source != "default" or numerics not in CLAIM_LOGPROB_THRESHOLDS:
            return self
        return dataclasses.replace(
            self,
            logprob=CLAIM_LOGPROB_THRESHOLDS[numerics],
            source=f"ditto's measured claim threshold against a {numerics} reference",
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
    comparison: str | None = None  # bitwise | tolerance: how the replayed fields were judged
    divergence: dict | None = None  # the first claimed value that differs: field, index, claimed, reference
    fields: list[dict] = field(default_factory=list)  # per replayed field: compared, different, flagged, max diff

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
        dv = self.divergence
        if dv and dv.get("index") is not None:
            out += (
                f"\n  first difference: {dv['field']}[{dv['index']}]: claimed {_show(dv['claimed'])}, "
                f"replay {_show(dv['reference'])}"
            )
        for f in self.fields:
            if f["different"] and not f["flagged"]:
                out += (
                    f"\n  {f['field']}: {f['different']}/{f['compared']} differ, largest by {f['max_abs_diff']:.3g},"
                    f" within tolerance {_show(f['tolerance'])}"
                )
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


@functools.lru_cache(maxsize=1)
def _measured_tolerances() -> dict[str, dict[str, float]]:
    """numerics -> {token, logprob_abs, activation}: honest `fast` noise on SmolLM2, with headroom."""
    doc = json.loads(resources.files("ditto.verify").joinpath("tolerances.json").read_text(encoding="utf-8"))
    return {mode: {k: float(v) for k, v in t.items()} for mode, t in doc["modes"].items()}


def _show(x) -> str:
    """A claimed or replayed value for people: floats with every digit that tells them apart."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, list | tuple) and len(x) > 4:
        return "[" + ", ".join(_show(v) for v in x[:4]) + f", ... ({len(x)} values)]"
    return repr(x) if isinstance(x, str) else str(x)


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
