"""Early exit when the answer has converged across checkpoints of the reasoning.

Reasoning is generated in chunks of `checkpoint_tokens`. After each chunk a short greedy probe
("... Final answer: \\boxed{") asks for the answer implied so far; once `patience` consecutive probes
agree, generation stops and that answer is returned. Probe tokens are counted like any others.
"""

from __future__ import annotations

from ditto.sampling import SamplingParams
from ditto.strategies.base import (
    BudgetExhausted,
    Meter,
    Strategy,
    derive_seed,
    extract_answer,
    is_equivalent,
    register,
)

PROBE_SUFFIX = "\n\n**Final Answer**\n\\boxed{"


def probe_answer(text: str) -> str | None:
    """The answer in a probe continuation: everything before the closing brace of \\boxed{."""
    depth = 1
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                ans = text[:i].strip()
                return ans or None
    return None


@register("early_exit")
class EarlyExit(Strategy):
    def __init__(
        self,
        checkpoint_tokens: int = 64,
        patience: int = 2,
        probe_tokens: int = 16,
        temperature: float = 0.0,
        seed: int = 0,
    ):
        self.checkpoint_tokens = checkpoint_tokens
        self.patience = patience
        self.probe_tokens = probe_tokens
        self.temperature = temperature
        self.seed = seed

    def _run(self, problem: str, meter: Meter, trace: dict):
        prompt = self.prompt(meter.policy, problem)
        text, tokens, streak, last = "", 0, 0, None
        trace["probes"] = []
        trace["exited_early"] = False
        for i in range(10_000):
            chunk = min(self.checkpoint_tokens, meter.budget.max_tokens - tokens)
            if chunk < 1:
                break
            try:
                params = SamplingParams(temperature=self.temperature, seed=derive_seed(self.seed, i), max_tokens=chunk)
                (c,) = meter.generate([prompt + text], params)[0]
                text += c.text
                tokens += len(c.token_ids)
                if c.finish_reason != "length":
                    break  # the model finished on its own
                probe_params = SamplingParams(temperature=0.0, seed=0, max_tokens=self.probe_tokens)
                (p,) = meter.generate([prompt + text + PROBE_SUFFIX], probe_params)[0]
            except BudgetExhausted:
                trace["budget_exhausted"] = i
                break
            ans = probe_answer(p.text)
            trace["probes"].append(ans)
            if ans is not None and last is not None and is_equivalent(ans, last):
                streak += 1
            else:
                streak = 1 if ans is not None else 0
            last = ans
            if streak >= self.patience:
                trace["exited_early"] = True
                return ans, text
        return extract_answer(text), text
