"""Step-level generation shared by the search strategies: partial solutions, the sampling
parameters of one step, and one round of proposing and scoring next steps.

A step ends at a blank line (stop="\\n\\n") or, with `step_rule=<int>`, after that many tokens.
A round is two calls a strategy keeps apart: `propose` (one generate call, which raises
BudgetExhausted before generating when the budget is spent) and `grow` (extend and score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ditto.outputs import CompletionOutput
from ditto.sampling import SamplingParams
from ditto.strategies.base import STEP_STOP, Meter, extract_answer
from ditto.strategies.scorers import Scorer


@dataclass
class Partial:
    steps: list[str] = field(default_factory=list)
    tokens: int = 0
    score: float = 0.0
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.steps)


def ends_step(c: CompletionOutput) -> bool:
    """Whether completion `c` stopped at a step boundary (the blank line itself is not in c.text)."""
    return c.finish_reason == "stop" and c.stop_reason == STEP_STOP


def step_params(step_rule: str | int, step_tokens: int, n: int, temperature: float, seed: int) -> SamplingParams:
    """Sampling parameters for `n` next steps: up to a blank line (at most `step_tokens` tokens),
    or exactly `step_rule` tokens when the rule is an int."""
    if step_rule == "blank_line":
        return SamplingParams(n=n, temperature=temperature, seed=seed, max_tokens=step_tokens, stop=(STEP_STOP,))
    if isinstance(step_rule, int) and step_rule > 0:
        return SamplingParams(n=n, temperature=temperature, seed=seed, max_tokens=step_rule)
    raise ValueError(f"unknown step rule {step_rule!r}")


def extend(parent: Partial, c: CompletionOutput, max_tokens: int) -> Partial:
    """The child of `parent` made by completion `c` (a step or a step prefix)."""
    if ends_step(c):
        step, done = c.text + STEP_STOP, False
    elif c.finish_reason == "length":
        step, done = c.text, False
    else:  # end of sequence (or another stop): the solution is finished
        step, done = c.text, True
    tokens = parent.tokens + len(c.token_ids)
    return Partial(parent.steps + [step], tokens, 0.0, done or tokens >= max_tokens)


def lengthen(p: Partial, c: CompletionOutput, max_tokens: int) -> None:
    """Continue the last step of `p` (a step prefix cut at its length) with completion `c`, in place."""
    grown = extend(Partial(p.steps[:-1], p.tokens), c, max_tokens)
    p.steps = p.steps[:-1] + [p.steps[-1] + grown.steps[-1]]
    p.tokens, p.done = grown.tokens, grown.done


def propose(
    meter: Meter, prompt: str, parents: Sequence[Partial], params: SamplingParams | list[SamplingParams]
) -> list[list[CompletionOutput]]:
    """Next steps of every parent in one generate call (shared prompt prefix): the completions of each."""
    return meter.generate([prompt + p.text for p in parents], params)


def grow(
    meter: Meter, scorer: Scorer, problem: str, parents: Sequence[Partial], outs: list[list[CompletionOutput]]
) -> list[Partial]:
    """The children of each parent made by each of its completions, scored, in proposal order."""
    children = [extend(p, c, meter.budget.max_tokens) for p, cs in zip(parents, outs) for c in cs]
    for ch in children:
        ch.score = scorer.score(meter, problem, ch.steps)
    return children


def best(pool: Sequence[Partial]) -> Partial | None:
    """The highest-scoring partial (the first of equals), or None for an empty pool."""
    return max(pool, key=lambda p: p.score, default=None)


def solution(p: Partial | None) -> tuple[str | None, str]:
    """(answer, text) of the chosen partial solution; (None, "") when there is none."""
    return (None, "") if p is None else (extract_answer(p.text), p.text)
