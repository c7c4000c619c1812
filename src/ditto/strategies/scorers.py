"""Scorers for partial or complete solutions: values in [0, 1], higher is better.

- LikelihoodScorer: length-normalised likelihood exp(mean log p) of the solution under a model
  (the policy itself when `backend` is None, or any second Backend).
- PRMScorer: adapts a process-reward-model plug-in (`ProcessRewardModel.step_scores`) with an
  aggregation over steps (last / min / prod / mean), as in search-and-learn.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from ditto.backends.base import Backend
from ditto.strategies.base import Meter, format_prompt


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, meter: Meter, problem: str, steps: list[str]) -> float:
        """Score of the (partial) solution `steps` to `problem`, in [0, 1]."""
        ...


@runtime_checkable
class ProcessRewardModel(Protocol):
    """A PRM plug-in: one score in [0, 1] per step (probability the step is correct so far)."""

    def step_scores(self, problem: str, steps: list[str]) -> list[float]: ...


class LikelihoodScorer:
    """exp(mean log p(solution | prompt)) under `backend` (None: the policy being run)."""

    scores_with_backend = True  # calls backend.score (see Strategy.scoring_backends)

    def __init__(self, backend: Backend | None = None, instruction: str | None = None):
        self.backend = backend
        self.instruction = instruction
        self.name = "self_likelihood" if backend is None else f"likelihood:{getattr(backend, 'name', 'model')}"

    def score(self, meter: Meter, problem: str, steps: list[str]) -> float:
        backend = self.backend or meter.policy
        text = "".join(steps)
        if not text:
            return 0.0
        prompt = (
            format_prompt(backend, problem)
            if self.instruction is None
            else format_prompt(backend, problem, self.instruction)
        )
        out = meter.score(prompt, text, backend=backend)
        if not out.logprobs:
            return 0.0
        return math.exp(out.mean)


class PRMScorer:
    def __init__(self, prm: ProcessRewardModel, aggregation: str = "last", name: str = "prm"):
        if aggregation not in ("last", "min", "prod", "mean"):
            raise ValueError(f"unknown aggregation {aggregation!r}")
        self.prm = prm
        self.aggregation = aggregation
        self.name = f"{name}:{aggregation}"

    def score(self, meter: Meter, problem: str, steps: list[str]) -> float:
        if not steps:
            return 0.0
        meter.scorer_calls += 1
        scores = [min(1.0, max(0.0, float(s))) for s in self.prm.step_scores(problem, steps)]
        if not scores:
            return 0.0
        return aggregate(scores, self.aggregation)


def aggregate(scores: list[float], how: str) -> float:
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "mean":
        return sum(scores) / len(scores)
    raise ValueError(how)
