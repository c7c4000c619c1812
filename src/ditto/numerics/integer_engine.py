"""Wire the `integer` numerics mode (determinism level `exact`) into the engine: `prepare_integer`.

`prepare_integer(loaded, config)` returns a `ditto.numerics.Prepared` whose model runs on int32
tensors end to end (ditto.numerics.integer), with an int8 paged KV cache, the integer paged
attention context and an integer sampler.

Calibration. The integer formats come from activation ranges measured once on a fixed text shipped
with ditto (calibration_text.txt). They are looked up, in order, next to the model file
(`calibration_path`) and in ~/.cache/ditto/calibration/<weights digest>.safetensors; when neither
exists they are computed (float forward over the text), rounded up to 8 significant bits (so that two
machines computing them independently almost always store the same numbers) and saved next to the
model, or in the cache directory when the model directory is read-only. The calibration file is part
of the model's identity: its sha256 is `Prepared.digest_extra`, so `LLM.model_digest` covers it.
Copy the file along with the model to reproduce outputs on another machine.

Integer sampling (`IntegerSampler`), mirroring ditto.sampling.PROCESSING_ORDER on the exact integer
logits L (int64, logit = L * 2^-F):
  1. repetition penalty p over prompt + output ids: P = round(p * 2^16) (exact, from the float);
     L > 0 -> round(L * 2^16 / P), L <= 0 -> round(L * P / 2^16)
  2. frequency f / presence r over output ids: L -= count * round(f * 2^F) + round(r * 2^F)
  3. temperature: T = 0 -> argmax L (lowest id on ties). Else S = L * M with M, e from
     integer_ops.temperature_multiplier: S = L / T in Q(24 + e)
  4. top-k: keep S >= the k-th largest S (integer sort; ties kept, like the float sampler)
  5. top-p: probabilities p = softmax_int over kept S (Q30, from S - max S in Q16); stable sort by
     p descending; drop tokens whose integer cumulative mass strictly before them >= round(top_p * 2^30)
     (the most likely token is always kept)
  6. min-p: keep p * 2^30 >= round(min_p * 2^30) * max p
  7. Gumbel-max: argmax over kept tokens of S + (g << e), g = gumbel_noise_int (Q24, integer only)
Every step is integer arithmetic (the float parameters enter only through correctly rounded
conversions to integers), so the token is the same on every machine. Tokens the engine masks
with -inf (min_tokens) are dropped before step 1. The engine also computes logprobs with
torch.log_softmax on the float32 logits: those are for display; the promise is on token ids and
integer logits.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from ditto.config import EXACT_NUMERICS
from ditto.numerics import Prepared
from ditto.numerics import calibration as cal
from ditto.numerics.base import NumericsMode, register
from ditto.numerics.integer import DenseIntContext, IntegerMode, IntegerPagedAttention, IntKVCache
from ditto.numerics.kernels import integer_ops as iops

CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")
CALIBRATION_CHUNK = 256
CALIBRATION_MAX_TOKENS = 4096  # small-vocabulary tokenizers split the text into more tokens: cap the cost
PROB_Q = 30


# ----------------------------------------------------------------------------- calibration
def calibration_text() -> str:
    return CALIBRATION_TEXT.read_text(encoding="utf-8")


def _cache_dir() -> Path:
    root = os.environ.get("DITTO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ditto")
    return Path(root) / "calibration"


def coarsen(stats: dict[str, torch.Tensor], bits: int = 8) -> dict[str, torch.Tensor]:
    """Round every float statistic up to `bits` significant bits (exact float64 ops only)."""
    out = {}
    for k, v in stats.items():
        if v.is_floating_point() and k != "num_tokens":
            mant, exp = torch.frexp(v.double())
            up = torch.ceil(mant * 2.0**bits) * 2.0**-bits
            v = torch.ldexp(up, exp.double()).to(torch.float64)
        out[k] = v
    return out


def compute_calibration(model, tokenizer, rope_positions: int = 8192) -> dict[str, torch.Tensor]:
    """Stats for IntegerMode from the shipped calibration text (runs the float model)."""
    chunks = cal.default_calibration_ids(
        lambda t: tokenizer.encode(t, add_special_tokens=False)[:CALIBRATION_MAX_TOKENS],
        calibration_text(),
        CALIBRATION_CHUNK,
    )
    return coarsen(cal.collect_stats(model, chunks, rope_positions=rope_positions))


def _atomic_save(path: Path, stats, meta) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calib-", suffix=".tmp")
    os.close(fd)
    try:
        cal.save_calibration(tmp, stats, meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _valid(stats: dict, model) -> bool:
    n = model.cfg.num_layers
    return f"L{n - 1}.h" in stats and f"L{n}.h" not in stats and "rope_index" in stats


def load_or_calibrate(loaded, rope_positions: int | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """(stats, path of the calibration file): next to the model, else the user cache, else computed and saved."""
    weights = loaded.digest
    primary = cal.calibration_path(loaded.path)
    fallback = _cache_dir() / f"{weights[:32]}.int-calib"
    for path in (primary, fallback):
        if path.is_file():
            try:
                stats, meta = cal.load_calibration(path, with_metadata=True)
            except (ValueError, OSError):
                continue
            if meta.get("model_digest") in (None, weights) and _valid(stats, loaded.model):
                return stats, path
    positions = rope_positions or min(8192, loaded.config.max_position)
    stats = compute_calibration(loaded.model, loaded.tokenizer, positions)
    meta = {"model_digest": weights, "text_sha256": cal.hashlib.sha256(calibration_text().encode()).hexdigest()}
    for path in (primary, fallback):
        try:
            return stats, _atomic_save(path, stats, meta)
        except OSError:
            continue
    raise OSError(f"cannot write the integer calibration to {primary} or {fallback}")


# ----------------------------------------------------------------------------- sampling
def _fixed(x: float, frac: int) -> int:
    """round(x * 2^frac) exactly (half away from zero via Fraction)."""
    return round(Fraction(x) * (1 << frac))


class IntegerSampler:
    """The engine's `sample` hook for integer models (see the module docstring for the order)."""

    def __init__(self, mode: IntegerMode):
        self.mode = mode

    def logits_int(self, logits_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        finite = torch.isfinite(logits_row)
        row = torch.where(finite, logits_row, torch.zeros_like(logits_row))
        return self.mode.logits_int(row), finite

    def process(self, L: torch.Tensor, finite, params, prompt_ids, output_ids):
        """Steps 1-6: (S int64, e, keep) — S = penalised L * M (Q(24+e)); for T = 0 S = penalised L."""
        frac = self.mode.logit_frac
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
            if len(seen):
                P = max(1, _fixed(params.repetition_penalty, 16))
                v = L[seen]
                pos = torch.div((v << 17) + P, 2 * P, rounding_mode="floor")
                neg = iops.rshift_round(v * P, 16)
                L = L.clone()
                L[seen] = torch.where(v > 0, pos, neg)
        if (params.frequency_penalty or params.presence_penalty) and len(output_ids):
            ids, counts = torch.tensor(list(output_ids), dtype=torch.long).unique(return_counts=True)
            L = L.clone()
            L[ids] -= counts * _fixed(params.frequency_penalty, frac) + _fixed(params.presence_penalty, frac)
        keep = finite.clone()
        if params.greedy:
            return L, 0, keep
        m, e = iops.temperature_multiplier(self.mode.logit_scale, params.temperature)
        S = L * m
        if params.top_k and params.top_k < int(keep.sum()):
            kth = torch.topk(S.masked_fill(~keep, -iops.I64_MAX), params.top_k).values[-1]
            keep &= kth <= S
        if params.top_p < 1.0 or params.min_p > 0.0:
            p = self.probs(S, e, keep)
            if params.top_p < 1.0:
                sorted_p, order = torch.sort(p, descending=True, stable=True)
                before = torch.cumsum(sorted_p, 0) - sorted_p
                drop_sorted = before >= _fixed(params.top_p, PROB_Q)
                drop_sorted[0] = False
                drop = torch.zeros_like(keep)
                drop[order] = drop_sorted
                keep &= ~drop
            if params.min_p > 0.0:
                keep &= (p << PROB_Q) >= _fixed(params.min_p, PROB_Q) * p.max()
        return S, e, keep

    @staticmethod
    def probs(S: torch.Tensor, e: int, keep: torch.Tensor) -> torch.Tensor:
        """softmax_int of S (Q(24+e)) over kept ids, probabilities in Q30 (int64)."""
        top = S.masked_fill(~keep, -iops.I64_MAX).max()
        d = iops.rshift_round(S - top, 24 + e - 16).clamp(min=-(1 << 31) + 1)  # Q16, <= 0
        return iops.softmax_int(d, 16, PROB_Q, keep)

    def __call__(self, logits_row, params, prompt_ids, output_ids, sample_index: int, token_index: int) -> int:
        L, finite = self.logits_int(logits_row)
        S, e, keep = self.process(L, finite, params, prompt_ids, output_ids)
        if params.greedy:
            return int(torch.argmax(S.masked_fill(~keep, -iops.I64_MAX)))
        assert params.seed is not None, "seed must be resolved before sampling"
        g = iops.gumbel_noise_int(params.seed, sample_index, token_index, S.numel())
        return int(torch.argmax((S + (g << e)).masked_fill(~keep, -iops.I64_MAX)))


# ----------------------------------------------------------------------------- prepare
def _make_cache(cfg, num_blocks: int, block_size: int) -> IntKVCache:
    return IntKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)


def _make_context(cache, slots, decode, prefills, cfg) -> IntegerPagedAttention:
    return IntegerPagedAttention(cache, slots, decode, prefills)


def _kv_bytes(cfg) -> int:
    return IntKVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)


def prepare_integer(loaded, config) -> Prepared:
    """Calibrate (or load the calibration), swap in the integer modules, return the engine bundle."""
    if config.kv_dtype not in (None, "int8"):
        raise ValueError(f"numerics 'integer' keeps its KV cache in int8; kv_dtype={config.kv_dtype!r} is unsupported")
    loaded.model.to("cpu")  # calibrated and converted on the CPU whatever the device (moved after)
    stats, path = load_or_calibrate(loaded)
    mode = IntegerMode(stats)
    model = mode.apply(loaded.model, config.device)  # derived on the CPU, then moved: the same integers anywhere
    digest = cal.calibration_digest(path)
    info = {"calibration": str(path), "calibration_sha256": digest, "logit_frac": mode.logit_frac}
    return Prepared(
        model,
        torch.int32,
        torch.int8,
        mode,
        make_cache=_make_cache,
        make_context=_make_context,
        kv_bytes_per_token=_kv_bytes,
        sample=IntegerSampler(mode),
        digest_extra=f"integer-calibration:{digest}".encode(),
        info=info,
    )


@dataclass(frozen=True)
class IntegerNumerics(NumericsMode):
    """The registry's `integer` mode. Its formats come from a calibration of the loaded model with its
    tokenizer, so it builds the whole bundle in `prepare` instead of converting a bare model in `apply`."""

    def prepare(self, loaded, config) -> Prepared:
        return prepare_integer(loaded, config)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise ValueError(
            "numerics 'integer' is calibrated with the model's tokenizer: "
            "use LLM(model, numerics='integer', determinism='exact') (or IntegerMode(stats).apply)"
        )


INTEGER = register(
    IntegerNumerics(
        EXACT_NUMERICS,
        torch.int32,
        "int8 per output channel, integer-only (int32 residual stream)",
        "int8",
        description="determinism 'exact': int8 GEMMs, dyadic requantisation, integer norms / softmax / SiLU / RoPE",
    )
)

__all__ = [
    "DenseIntContext",
    "IntegerNumerics",
    "IntegerSampler",
    "coarsen",
    "compute_calibration",
    "load_or_calibrate",
    "prepare_integer",
]
