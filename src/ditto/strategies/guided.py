"""Two-model strategies: chunk-level guided generation (LGS/CGS) and GlimpRouter.

The backend given to `run` is the small model (the proposer / first-token glimpser); the other
model is fixed at construction. Each model sees the problem in its own chat format, followed by the
shared solution text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ditto.backends.base import Backend
from ditto.sampling import SamplingParams
from ditto.strategies.base import (
    STEP_STOP,
    Budget,
    BudgetExhausted,
    Meter,
    Strategy,
    derive_seed,
    extract_answer,
    format_prompt,
    register,
)
from ditto.strategies.steps import ends_step, step_params


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("-inf")


@register("chunk_guided")
class ChunkGuided(Strategy):
    """Small model proposes k chunks of `chunk_tokens` tokens; the larger model picks one.

    LGS: highest mean log p_large.  CGS: highest mean log p_large - mean log p_small (the small
    model's log-probs come with the proposals, so they cost nothing extra).
    """

    def __init__(
        self,
        large: Backend,
        mode: str = "cgs",
        k: int = 4,
        chunk_tokens: int = 16,
        max_chunks: int = 32,
        temperature: float = 0.8,
        seed: int = 0,
    ):
        if mode not in ("lgs", "cgs"):
            raise ValueError("mode must be 'lgs' or 'cgs'")
        self.large = large
        self.mode = mode
        self.k = k
        self.chunk_tokens = chunk_tokens
        self.max_chunks = max_chunks
        self.temperature = temperature
        self.seed = seed

    def scoring_backends(self, policy: Backend) -> list[Backend]:
        return [self.large]

    def _run(self, problem: str, meter: Meter, trace: dict):
        small_prompt = self.prompt(meter.policy, problem)
        large_prompt = self.prompt(self.large, problem)
        k = meter.samples(self.k)
        text, tokens = "", 0
        trace["chunks"] = []
        for i in range(self.max_chunks):
            params = SamplingParams(
                n=k, temperature=self.temperature, seed=derive_seed(self.seed, i), max_tokens=self.chunk_tokens
            )
            try:
                (cands,) = meter.generate([small_prompt + text], params)
                scores = []
                for c in cands:
                    if not c.text:
                        scores.append(float("-inf"))
                        continue
                    lp_large = _mean(meter.score(large_prompt + text, c.text, backend=self.large).logprobs)
                    s = lp_large - _mean(c.logprobs) if self.mode == "cgs" else lp_large
                    scores.append(s)
            except BudgetExhausted:
                trace["budget_exhausted"] = i
                break
            best = max(range(len(cands)), key=lambda j: (scores[j], -j))
            c = cands[best]
            text += c.text
            tokens += len(c.token_ids)
            trace["chunks"].append({"chosen": best, "scores": [round(s, 6) for s in scores]})
            if c.finish_reason == "stop" or tokens >= meter.budget.max_tokens:
                break
        return extract_answer(text), text


def first_token_entropy(top_logprobs: dict[int, float]) -> float:
    """Entropy (nats) of the renormalised top-k distribution of one position."""
    if not top_logprobs:
        return 0.0
    lps = list(top_logprobs.values())
    m = max(lps)
    ps = [math.exp(lp - m) for lp in lps]
    z = sum(ps)
    return -sum((p / z) * math.log(p / z) for p in ps if p > 0)


def _glimpse(meter: Meter, backend: Backend, prompt: str, seed: int):
    params = SamplingParams(temperature=0.0, seed=seed, max_tokens=1, logprobs=20, stop=(STEP_STOP,))
    (c,) = meter.generate([prompt], params, backend=backend)[0]
    top = c.top_logprobs[0] if c.top_logprobs else {}
    return c, first_token_entropy(top)


@register("glimp_router")
class GlimpRouter(Strategy):
    """Per step the small model writes the first token; if its entropy exceeds `threshold`,
    the large model writes the whole step instead, else the small model finishes it."""

    def __init__(
        self, large: Backend, threshold: float = 1.0, step_tokens: int = 128, max_steps: int = 16, seed: int = 0
    ):
        self.large = large
        self.threshold = threshold
        self.step_tokens = step_tokens
        self.max_steps = max_steps
        self.seed = seed

    def _run(self, problem: str, meter: Meter, trace: dict):
        small = meter.policy
        prompts = {
            "small": self.prompt(small, problem),
            "large": self.prompt(self.large, problem),
        }
        text = ""
        tokens = 0
        trace["threshold"] = self.threshold
        trace["steps"] = []
        for s in range(self.max_steps):
            try:
                probe, h = _glimpse(meter, small, prompts["small"] + text, derive_seed(self.seed, s, 0))
                if probe.finish_reason == "stop" and probe.stop_reason != STEP_STOP and not probe.text:
                    trace["steps"].append({"entropy": h, "model": "small", "end": True})
                    break
                params = step_params(
                    "blank_line", self.step_tokens, n=1, temperature=0.0, seed=derive_seed(self.seed, s, 1)
                )
                if h > self.threshold:
                    who, head, head_tokens = "large", "", 0
                    (c,) = meter.generate([prompts["large"] + text], params, backend=self.large)[0]
                else:
                    who, head, head_tokens = "small", probe.text, len(probe.token_ids)
                    if probe.finish_reason == "stop":  # the step (or solution) ended after one token
                        c, head, head_tokens = probe, "", 0
                    else:
                        (c,) = meter.generate([prompts["small"] + text + head], params, backend=small)[0]
            except BudgetExhausted:
                trace["budget_exhausted"] = s
                break
            ended_step = ends_step(c)
            text += head + c.text + (STEP_STOP if ended_step else "")
            tokens += head_tokens + len(c.token_ids)
            trace["steps"].append({"entropy": round(h, 6), "model": who})
            if (c.finish_reason == "stop" and not ended_step) or tokens >= meter.budget.max_tokens:
                break
        trace["large_fraction"] = sum(st["model"] == "large" for st in trace["steps"]) / max(1, len(trace["steps"]))
        return extract_answer(text), text


def glimp_step_entropies(small: Backend, prompt: str, max_steps: int = 8, step_tokens: int = 64) -> list[float]:
    """First-token entropy of every step of the small model's own greedy solution to `prompt`."""
    meter = Meter(Budget(max_tokens=max_steps * step_tokens), small)
    entropies: list[float] = []
    text = ""
    for s in range(max_steps):
        _, h = _glimpse(meter, small, prompt + text, s)
        entropies.append(h)
        params = step_params("blank_line", step_tokens, n=1, temperature=0.0, seed=0)
        (c,) = meter.generate([prompt + text], params)[0]
        ended_step = ends_step(c)
        text += c.text + (STEP_STOP if ended_step else "")
        if c.finish_reason == "stop" and not ended_step:
            break
    return entropies


def calibrate_glimp_threshold(
    small: Backend,
    problems: Sequence[str],
    large_fraction: float = 0.25,
    max_steps: int = 8,
    step_tokens: int = 64,
    prompt_fn: Callable[[Backend, str], str] = format_prompt,
    workers: int = 1,
) -> float:
    """Threshold so that about `large_fraction` of steps on held-out `problems` go to the large model.

    Runs the small model alone (greedy, step by step), collects the first-token entropy of every
    step and returns the (1 - large_fraction) quantile. Prompts come from `prompt_fn(small, problem)`
    (the router's own `prompt`, or the strategies' default chat format); `workers` problems run at
    once (their requests share the engine's batch on a thread-safe backend).
    """
    if not 0.0 <= large_fraction <= 1.0:
        raise ValueError("large_fraction must be in [0, 1]")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        per_problem = pool.map(
            lambda p: glimp_step_entropies(small, prompt_fn(small, p), max_steps, step_tokens), problems
        )
        entropies = sorted(h for hs in per_problem for h in hs)
    if not entropies:
        raise ValueError("no steps to calibrate on")
    if large_fraction <= 0.0:
        return entropies[-1]  # nothing exceeds the maximum
    q = 1.0 - large_fraction
    idx = min(len(entropies) - 1, max(0, math.ceil(q * len(entropies)) - 1))
    return entropies[idx]
