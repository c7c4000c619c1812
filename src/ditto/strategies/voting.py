"""Whole-solution strategies: greedy, self-consistency, best-of-N, weighted majority."""

from __future__ import annotations

from ditto.sampling import SamplingParams
from ditto.strategies.base import (
    Meter,
    Strategy,
    extract_answer,
    majority_vote,
    register,
    split_steps,
)
from ditto.strategies.scorers import LikelihoodScorer, Scorer


@register("greedy")
class Greedy(Strategy):
    def __init__(self, max_tokens: int | None = None):
        self.max_tokens = max_tokens

    def _run(self, problem: str, meter: Meter, trace: dict):
        prompt = self.prompt(meter.policy, problem)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens or meter.budget.max_tokens, seed=0)
        (c,) = meter.generate([prompt], params)[0]
        answer = extract_answer(c.text)
        trace["finish_reason"] = c.finish_reason
        trace["answers"] = [answer]
        return answer, c.text


class _Sampled(Strategy):
    """Draw n complete solutions in one backend call."""

    def __init__(self, n: int = 8, temperature: float = 0.7, top_p: float = 1.0, seed: int = 0, max_tokens=None):
        self.n = n
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.max_tokens = max_tokens

    def sample(self, problem: str, meter: Meter, trace: dict):
        n = meter.samples(self.n)
        prompt = self.prompt(meter.policy, problem)
        params = SamplingParams(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            max_tokens=self.max_tokens or meter.budget.max_tokens,
        )
        outs = meter.generate([prompt], params)[0]
        answers = [extract_answer(c.text) for c in outs]
        trace["answers"] = answers
        trace["finish_reasons"] = [c.finish_reason for c in outs]
        return outs, answers


@register("self_consistency")
class SelfConsistency(_Sampled):
    def _run(self, problem: str, meter: Meter, trace: dict):
        outs, answers = self.sample(problem, meter, trace)
        vote = majority_vote(answers)
        trace["votes"] = vote.groups
        text = next((c.text for c, a in zip(outs, answers) if a is not None and a == vote.answer), outs[0].text)
        return vote.answer, text


def score_solutions(scorer: Scorer, meter: Meter, problem: str, texts: list[str], step_rule="blank_line"):
    return [scorer.score(meter, problem, split_steps(t, step_rule)) for t in texts]


@register("best_of_n")
class BestOfN(_Sampled):
    def __init__(self, scorer: Scorer | None = None, **kw):
        super().__init__(**kw)
        self.scorer = scorer or LikelihoodScorer()

    def _run(self, problem: str, meter: Meter, trace: dict):
        outs, answers = self.sample(problem, meter, trace)
        scores = score_solutions(self.scorer, meter, problem, [c.text for c in outs])
        trace["scores"] = scores
        best = max(range(len(outs)), key=lambda i: (scores[i], -i))
        trace["chosen"] = best
        return answers[best], outs[best].text


@register("weighted_majority")
class WeightedMajority(BestOfN):
    def _run(self, problem: str, meter: Meter, trace: dict):
        outs, answers = self.sample(problem, meter, trace)
        scores = score_solutions(self.scorer, meter, problem, [c.text for c in outs])
        trace["scores"] = scores
        vote = majority_vote(answers, scores)
        trace["votes"] = vote.groups
        text = next((c.text for c, a in zip(outs, answers) if a is not None and a == vote.answer), outs[0].text)
        return vote.answer, text
