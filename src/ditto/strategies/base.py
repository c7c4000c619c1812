"""Shared pieces of every strategy: Budget, Cost, Result, the metered backend door, the registry,
step splitting, answer extraction and voting.

Strategies reach models only through `Meter`, which calls the `Backend` protocol and counts cost from
what the backend returned: generated tokens = sum of len(token_ids) of every completion, scored
tokens = sum of len(token_ids) of every ScoreOutput, one model call per generate/score call.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ditto.backends.base import Backend
from ditto.eval.answer_equivalence import fallback_equal
from ditto.eval.answer_extraction import extract_answer as _extract
from ditto.outputs import CompletionOutput, ScoreOutput
from ditto.sampling import SamplingParams

DEFAULT_INSTRUCTION = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
STEP_STOP = "\n\n"


class BudgetExhausted(Exception):
    """Raised by the meter when a call would exceed the budget; strategies stop and answer."""


@dataclass(frozen=True)
class Budget:
    max_generated_tokens: int | None = None  # total over all models and calls (strict cap)
    max_samples: int | None = None  # caps n-style knobs (samples, candidates, beams * expansions)
    max_tokens: int = 512  # length cap of one completion / one solution
    max_model_calls: int | None = None


@dataclass(frozen=True)
class Cost:
    generated_tokens: int = 0
    scored_tokens: int = 0  # continuation tokens whose logprobs were asked for (an engine may serve some from cache)
    model_calls: int = 0
    scorer_calls: int = 0  # process-reward-model plug-in calls
    sandbox_runs: int = 0
    wall_time_s: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.generated_tokens + other.generated_tokens,
            self.scored_tokens + other.scored_tokens,
            self.model_calls + other.model_calls,
            self.scorer_calls + other.scorer_calls,
            self.sandbox_runs + other.sandbox_runs,
            self.wall_time_s + other.wall_time_s,
        )


@dataclass(frozen=True)
class Result:
    answer: str | None
    trace: dict
    cost: Cost
    text: str = ""  # the chosen solution text (when there is one)


class Meter:
    """The metered door to backends for one `Strategy.run`."""

    def __init__(self, budget: Budget, policy: Backend):
        self.budget = budget
        self.policy = policy
        self.generated_tokens = 0
        self.scored_tokens = 0
        self.model_calls = 0
        self.scorer_calls = 0
        self.sandbox_runs = 0
        self.start = time.perf_counter()
        self.prefix_caching = bool(_info(policy).get("prefix_caching", False))

    # budget ----------------------------------------------------------------------------------
    def tokens_left(self) -> int | None:
        if self.budget.max_generated_tokens is None:
            return None
        return self.budget.max_generated_tokens - self.generated_tokens

    def samples(self, wanted: int) -> int:
        cap = self.budget.max_samples
        return max(1, min(wanted, cap)) if cap is not None else max(1, wanted)

    def per_sample_tokens(self, wanted: int, n_total: int) -> int:
        """Largest max_tokens such that n_total completions cannot overrun the budget."""
        wanted = min(wanted, self.budget.max_tokens)
        left = self.tokens_left()
        if left is not None:
            wanted = min(wanted, left // max(1, n_total))
        if wanted < 1:
            raise BudgetExhausted("generated-token budget exhausted")
        return wanted

    def _check_calls(self) -> None:
        if self.budget.max_model_calls is not None and self.model_calls >= self.budget.max_model_calls:
            raise BudgetExhausted("model-call budget exhausted")

    # backend calls ---------------------------------------------------------------------------
    def generate(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams], backend: Backend | None = None
    ) -> list[list[CompletionOutput]]:
        """One backend.generate call; returns the completions of each prompt. Caps max_tokens to the budget."""
        backend = backend or self.policy
        plist = params if isinstance(params, list) else [params] * len(prompts)
        total_n = sum(p.n for p in plist)
        capped = [p.replace(max_tokens=self.per_sample_tokens(p.max_tokens, total_n)) for p in plist]
        self._check_calls()
        outs = backend.generate(list(prompts), capped)
        self.model_calls += 1
        result = []
        for ro in outs:
            for c in ro.outputs:
                self.generated_tokens += len(c.token_ids)
            result.append(list(ro.outputs))
        return result

    def score(self, prompt: str, continuation: str, backend: Backend | None = None) -> ScoreOutput:
        backend = backend or self.policy
        self._check_calls()
        out = backend.score(prompt, continuation)
        self.model_calls += 1
        self.scored_tokens += len(out.token_ids)
        return out

    def cost(self) -> Cost:
        return Cost(
            self.generated_tokens,
            self.scored_tokens,
            self.model_calls,
            self.scorer_calls,
            self.sandbox_runs,
            time.perf_counter() - self.start,
        )


def _info(backend: Backend) -> dict:
    try:
        info = backend.info()
        return info if isinstance(info, dict) else {}
    except Exception:  # noqa: BLE001 - info is advisory
        return {}


def format_prompt(backend: Backend, problem: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    return backend.chat_prompt([{"role": "user", "content": instruction.format(problem=problem)}])


# Strategy base and registry ---------------------------------------------------------------------

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_strategy(name: str, **kwargs) -> Strategy:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {sorted(_REGISTRY)}") from None
    return cls(**kwargs)


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


class Strategy:
    """`run(problem, backend, budget) -> Result`; subclasses implement `_run(problem, meter)`."""

    name = "strategy"
    instruction: str = DEFAULT_INSTRUCTION
    # (backend, problem) -> prompt text: set by the eval to render the task's own prompt format (e.g.
    # few-shot chat turns) instead of `instruction`; strategies with a tool protocol keep theirs
    prompt_renderer: Callable[[Backend, str], str] | None = None
    uses_task_prompt = True

    def prompt(self, backend: Backend, problem: str) -> str:
        """The prompt the policy model sees for `problem`."""
        if self.prompt_renderer is not None and self.uses_task_prompt:
            return self.prompt_renderer(backend, problem)
        return format_prompt(backend, problem, self.instruction)

    def scoring_backends(self, policy: Backend) -> list[Backend]:
        """The backends `run` asks for teacher-forced logprobs (`score`), so that one that cannot score
        (e.g. a server without echo/prompt logprobs) is refused before any problem starts."""
        scorer = getattr(self, "scorer", None)
        if getattr(scorer, "scores_with_backend", False):
            return [scorer.backend or policy]
        return []

    def run(self, problem: str, backend: Backend, budget: Budget | None = None) -> Result:
        meter = Meter(budget or Budget(), backend)
        trace: dict = {"strategy": self.name, "config": self.config()}
        try:
            answer, text = self._run(problem, meter, trace)
        except BudgetExhausted as e:  # a strategy that could not even start
            trace["budget_exhausted"] = str(e)
            answer, text = None, ""
        return Result(answer=answer, trace=trace, cost=meter.cost(), text=text)

    def _run(self, problem: str, meter: Meter, trace: dict) -> tuple[str | None, str]:
        raise NotImplementedError

    def config(self) -> dict:
        out = {}
        for k, v in vars(self).items():
            if isinstance(v, str | int | float | bool | type(None)) or (
                isinstance(v, tuple) and all(isinstance(x, str | int | float) for x in v)
            ):
                out[k] = v
            else:
                out[k] = getattr(v, "name", type(v).__name__)
        return out


# Steps ------------------------------------------------------------------------------------------


def split_steps(text: str, rule: str | int = "blank_line", tokenizer: Backend | None = None) -> list[str]:
    """Split a solution into steps: on blank lines ("blank_line") or in fixed chunks of `rule` tokens.

    Steps keep their separators, so "".join(steps) == text.
    """
    if rule == "blank_line":
        parts = re.split(r"(\n\s*\n)", text)
        steps: list[str] = []
        for i in range(0, len(parts), 2):
            piece = parts[i] + (parts[i + 1] if i + 1 < len(parts) else "")
            if piece:
                steps.append(piece)
        return steps
    if isinstance(rule, int) and rule > 0:
        if tokenizer is None:
            return [text[i : i + rule] for i in range(0, len(text), rule)]
        ids = tokenizer.encode(text, add_special_tokens=False)
        return [tokenizer.decode(ids[i : i + rule]) for i in range(0, len(ids), rule)]
    raise ValueError(f"unknown step rule {rule!r}")


# Answers ----------------------------------------------------------------------------------------


def extract_answer(text: str) -> str | None:
    """The final answer of a solution text, by the evaluation harness's extractor (boxed, "the answer
    is", GSM8K ####, last number), so strategies vote on exactly what `ditto eval` grades."""
    return _extract(text)[0]


def is_equivalent(a: str, b: str) -> bool:
    """Whether two answers are the same for voting: the harness's normalised numeric/string check
    (in-process and never slow; Math-Verify runs only in the grader's worker processes)."""
    return fallback_equal(a, b)


@dataclass
class Vote:
    answer: str | None
    weight: float
    count: int
    groups: list[tuple[str, float, int]] = field(default_factory=list)  # (representative, weight, count)


def majority_vote(
    answers: Sequence[str | None],
    weights: Sequence[float] | None = None,
    equivalent: Callable[[str, str], bool] | None = None,
) -> Vote:
    """(Weighted) plurality over equivalence classes; None answers abstain.

    Ties go to the class seen first, so the result does not depend on dict ordering.
    """
    equivalent = equivalent or is_equivalent
    weights = [1.0] * len(answers) if weights is None else list(weights)
    if len(weights) != len(answers):
        raise ValueError("answers and weights differ in length")
    reps: list[str] = []
    tot: list[float] = []
    cnt: list[int] = []
    for a, w in zip(answers, weights):
        if a is None:
            continue
        for i, r in enumerate(reps):
            if r == a or equivalent(r, a):
                tot[i] += float(w)
                cnt[i] += 1
                break
        else:
            reps.append(a)
            tot.append(float(w))
            cnt.append(1)
    if not reps:
        return Vote(None, 0.0, 0, [])
    best = max(range(len(reps)), key=lambda i: (tot[i], -i))
    return Vote(reps[best], tot[best], cnt[best], list(zip(reps, tot, cnt)))


def derive_seed(seed: int, *coords: int) -> int:
    """A reproducible per-call seed from a base seed and integer coordinates."""
    x = seed & ((1 << 63) - 1)
    for c in coords:
        x = (x * 1_000_003 + c + 1) % (1 << 62)
    return x
