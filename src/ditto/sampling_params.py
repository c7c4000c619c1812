"""SamplingParams: how to sample one request, its defaults and its checks (re-exported by ditto.sampling).

Defaults: one set for the Python API, every CLI command and the server (the CLI reads its defaults
from this dataclass, the server's request model too), documented in the README's "Defaults" table:

* temperature 0 (greedy). vLLM and OpenAI default to T = 1, but then a plain call is a random draw:
  ditto's first promise is that the same call gives the same text, and greedy output is a pure
  function of model and prompt. It is also the standard setting for reasoning evaluation
  (GSM8K / MATH greedy, as in lm-evaluation-harness). Pass temperature > 0 to sample.
* max_tokens 512. vLLM's 16 (from OpenAI's legacy completions) cuts every reasoning answer short;
  512 holds a GSM8K or MATH-500 solution. Generation still ends at EOS or a stop string first.
* seed None: each request draws a fresh seed, which is recorded in its output and receipt, so any
  sample can be replayed. A fixed default seed would give identical samples to identical prompts
  in a batch or to repeated requests (pass@k, voting and retries would silently see one sample).
  Pin `seed` to make a sampled run repeatable.
* no filtering and no penalties (top_k 0, top_p 1, min_p 0, penalties neutral), n 1.

Every field is checked on construction; an error names the field, what it must be and what it got.
"""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import asdict, dataclass, field

PROCESSING_ORDER = (
    "repetition_penalty",
    "frequency_presence_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "gumbel_max",
)

MAX_N = 1024
MAX_LOGPROBS = 20
FINGERPRINT_WIDTHS = (0, 8, 16, 32)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _kind(x) -> str:
    return f"{type(x).__name__} {x!r}"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. Defaults: greedy, at most 512 new tokens, a fresh recorded seed
    (see the module docstring for why they differ from vLLM's T=1 / 16 tokens)."""

    n: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 (or -1) disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None -> a random seed is drawn and recorded in the output
    max_tokens: int = 512
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0: only the sampled)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    fingerprint_k: int = 0  # Activation-DiFR fingerprint width (0: none)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        self._normalise_sequences()
        self._check_types()
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._check_ranges()

    def _normalise_sequences(self) -> None:
        stop = self.stop
        if stop is None or isinstance(stop, str):
            stop = () if stop is None else (stop,)
        elif not isinstance(stop, list | tuple):
            raise TypeError(f"stop must be a string or a list of strings, got {_kind(stop)}")
        bad = next((s for s in stop if not isinstance(s, str) or not s), None)
        if bad is not None:
            raise ValueError(f"stop strings must be non-empty strings, got {bad!r}")
        object.__setattr__(self, "stop", tuple(stop))
        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, list | tuple) or not all(_is_int(t) for t in ids):
            raise TypeError(f"stop_token_ids must be a list of token ids (integers), got {ids!r}")
        if any(t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {list(ids)!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))

    def _check_types(self) -> None:
        ints = ("n", "top_k", "max_tokens", "min_tokens", "fingerprint_k")
        reals = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
        flags = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
        for name in ints:
            if not _is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an integer, got {_kind(getattr(self, name))}")
        for name in reals:
            if not _is_real(getattr(self, name)):
                raise TypeError(f"{name} must be a number, got {_kind(getattr(self, name))}")
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {_kind(getattr(self, name))}")
        for name in ("seed", "logprobs"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise TypeError(f"{name} must be an integer or None, got {_kind(value)}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {_kind(self.extra)}")

    def _check_ranges(self) -> None:
        def finite(x) -> bool:
            return math.isfinite(x)

        checks = [
            ("n", 1 <= self.n <= MAX_N, f"in [1, {MAX_N}]"),
            ("temperature", finite(self.temperature) and 0.0 <= self.temperature <= 100.0, "in [0, 100] (0 = greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 or -1 disables)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", finite(self.repetition_penalty) and self.repetition_penalty > 0, "> 0 (1 = off)"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"in [0, max_tokens={self.max_tokens}]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "in [0, 2^63) or None (drawn at random)"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"),
            ("fingerprint_k", self.fingerprint_k in FINGERPRINT_WIDTHS, "0, 8, 16 or 32"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_seed(self) -> SamplingParams:
        """A copy whose seed is set (drawn at random when it was None)."""
        if self.seed is not None:
            return self
        return self.replace(seed=random.SystemRandom().randrange(2**31))

    def replace(self, **changes) -> SamplingParams:
        fields = {k: v for k, v in asdict(self).items()}
        fields.update(changes)
        return SamplingParams(**fields)

    def record(self) -> dict:
        """Everything that determines the sample, for receipts and manifests."""
        rec = {k: v for k, v in asdict(self).items() if k != "extra"}
        rec["stop"] = list(self.stop)
        rec["stop_token_ids"] = list(self.stop_token_ids)
        rec["processing_order"] = list(PROCESSING_ORDER)
        rec["noise"] = "splitmix64-gumbel-v1"
        return rec


DEFAULTS = SamplingParams()
