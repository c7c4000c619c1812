"""Step-level search: beam search, A*-decoding and early rejection of partial steps.

A step ends at a blank line (stop="\\n\\n") or, with `step_rule=<int>`, after that many tokens.
All beams of one round go to the backend in one generate call, so a backend with prefix caching
computes their shared prompt prefix once (recorded in the trace as `prefix_caching`).
"""

from __future__ import annotations

import heapq

from ditto.strategies.base import STEP_STOP, BudgetExhausted, Meter, Strategy, derive_seed, register
from ditto.strategies.scorers import LikelihoodScorer, Scorer
from ditto.strategies.steps import Partial, best, grow, lengthen, propose, solution, step_params


@register("beam_search")
class StepBeamSearch(Strategy):
    def __init__(
        self,
        scorer: Scorer | None = None,
        beam_width: int = 4,
        expand: int = 4,
        max_steps: int = 8,
        step_tokens: int = 128,
        step_rule: str | int = "blank_line",
        temperature: float = 0.7,
        seed: int = 0,
    ):
        self.scorer = scorer or LikelihoodScorer()
        self.beam_width = beam_width
        self.expand = expand
        self.max_steps = max_steps
        self.step_tokens = step_tokens
        self.step_rule = step_rule
        self.temperature = temperature
        self.seed = seed

    def _run(self, problem: str, meter: Meter, trace: dict):
        prompt = self.prompt(meter.policy, problem)
        width = meter.samples(self.beam_width)
        expand = max(1, meter.samples(width * self.expand) // width)
        beams = [Partial()]
        finished: list[Partial] = []
        trace["prefix_caching"] = meter.prefix_caching
        trace["rounds"] = []
        for step in range(self.max_steps):
            active = [b for b in beams if not b.done]
            if not active:
                break
            params = [
                step_params(self.step_rule, self.step_tokens, expand, self.temperature, derive_seed(self.seed, step, i))
                for i in range(len(active))
            ]
            try:
                outs = propose(meter, prompt, active, params)
            except BudgetExhausted:
                trace["budget_exhausted"] = step
                break
            children = grow(meter, self.scorer, problem, active, outs)
            children.sort(key=lambda p: -p.score)
            finished += [ch for ch in children if ch.done]
            beams = [ch for ch in children if not ch.done][:width]
            trace["rounds"].append({"candidates": len(children), "scores": [round(c.score, 6) for c in children]})
            if len(finished) >= width:
                break
        pick = best(finished or beams)
        if pick is None:
            return None, ""
        trace["finished"] = len(finished)
        trace["best_score"] = pick.score
        return solution(pick)


@register("astar")
class AStarDecoding(Strategy):
    """Best-first search over partial solutions: f = g + h, g = step_cost * depth, h = 1 - score."""

    def __init__(
        self,
        scorer: Scorer | None = None,
        k: int = 4,
        max_expansions: int = 16,
        step_cost: float = 0.05,
        step_tokens: int = 128,
        step_rule: str | int = "blank_line",
        temperature: float = 0.7,
        seed: int = 0,
    ):
        self.scorer = scorer or LikelihoodScorer()
        self.k = k
        self.max_expansions = max_expansions
        self.step_cost = step_cost
        self.step_tokens = step_tokens
        self.step_rule = step_rule
        self.temperature = temperature
        self.seed = seed

    def _run(self, problem: str, meter: Meter, trace: dict):
        prompt = self.prompt(meter.policy, problem)
        k = meter.samples(self.k)
        counter = 0
        heap: list[tuple[float, int, Partial]] = [(1.0, counter, Partial())]
        best_seen: Partial | None = None
        expansions = 0
        trace["popped"] = []
        while heap and expansions < self.max_expansions:
            f, _, node = heapq.heappop(heap)
            trace["popped"].append(round(f, 6))
            if node.done:
                trace["expansions"] = expansions
                trace["solved"] = True
                return solution(node)
            params = step_params(
                self.step_rule, self.step_tokens, k, self.temperature, derive_seed(self.seed, expansions)
            )
            try:
                outs = propose(meter, prompt, [node], params)
            except BudgetExhausted:
                trace["budget_exhausted"] = expansions
                heapq.heappush(heap, (f, counter, node))
                break
            expansions += 1
            for child in grow(meter, self.scorer, problem, [node], outs):
                counter += 1
                heapq.heappush(heap, (self.step_cost * len(child.steps) + 1.0 - child.score, counter, child))
                if best_seen is None or child.score > best_seen.score:
                    best_seen = child
        trace["expansions"] = expansions
        trace["solved"] = False
        return solution(best([n for _, _, n in heap if n.done]) or best_seen)


@register("early_rejection")
class EarlyRejection(Strategy):
    """Per step: draw `m` candidate step prefixes of `prefix_tokens` tokens, score them, and finish
    only the best `keep` (they become the beams of the next step)."""

    def __init__(
        self,
        scorer: Scorer | None = None,
        m: int = 8,
        keep: int = 2,
        prefix_tokens: int = 16,
        step_tokens: int = 128,
        max_steps: int = 8,
        temperature: float = 0.7,
        seed: int = 0,
    ):
        self.scorer = scorer or LikelihoodScorer()
        self.m = m
        self.keep = keep
        self.prefix_tokens = prefix_tokens
        self.step_tokens = step_tokens
        self.max_steps = max_steps
        self.temperature = temperature
        self.seed = seed

    def _run(self, problem: str, meter: Meter, trace: dict):
        prompt = self.prompt(meter.policy, problem)
        keep = meter.samples(self.keep)
        per_beam = max(1, meter.samples(self.m) // keep)
        beams = [Partial()]
        finished: list[Partial] = []
        trace["rounds"] = []
        for step in range(self.max_steps):
            active = [b for b in beams if not b.done]
            if not active:
                break
            try:
                # 1. cheap prefixes of every candidate step
                seed = derive_seed(self.seed, step, 0)
                params = step_params("blank_line", self.prefix_tokens, per_beam, self.temperature, seed)
                cands = grow(meter, self.scorer, problem, active, propose(meter, prompt, active, params))
                cands.sort(key=lambda p: -p.score)
                kept, rejected = cands[:keep], len(cands) - min(keep, len(cands))
                # 2. finish the steps of the survivors that were cut at the prefix length
                todo = [p for p in kept if not p.done and not p.steps[-1].endswith(STEP_STOP)]
                if todo:
                    rest_tokens, seed = max(1, self.step_tokens - self.prefix_tokens), derive_seed(self.seed, step, 1)
                    fin = step_params("blank_line", rest_tokens, n=1, temperature=self.temperature, seed=seed)
                    for p, (c,) in zip(todo, propose(meter, prompt, todo, fin)):
                        lengthen(p, c, meter.budget.max_tokens)
                        p.score = self.scorer.score(meter, problem, p.steps)
            except BudgetExhausted:
                trace["budget_exhausted"] = step
                break
            trace["rounds"].append({"candidates": len(cands), "rejected": rejected})
            finished += [p for p in kept if p.done]
            beams = [p for p in kept if not p.done]
        return solution(best(finished or beams))
