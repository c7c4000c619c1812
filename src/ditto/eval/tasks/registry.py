"""Task registry: name -> Task factory."""

from __future__ import annotations

from ditto.eval.tasks.arith import Arith
from ditto.eval.tasks.base import Task
from ditto.eval.tasks.gsm8k import GSM8K
from ditto.eval.tasks.math500 import Math500

TASKS = {
    "gsm8k": "GSM8K word problems (JSONL with question / answer '#### N')",
    "math500": "MATH-500 competition problems (JSONL with problem / answer / level)",
    "arith": "generated arithmetic word problems (knobs: --arith-digits, --arith-steps, --arith-ops)",
    "arith-easy": "arith with one-digit operands and one step (a level small models half-solve)",
}


def get_task(
    name: str, *, data: str | None = None, digits="1", steps="1", count: int = 200, seed: int = 0, ops: str = "+-*"
) -> Task:
    """Build a task by name. `data` (file or folder) applies to gsm8k / math500; the rest to arith."""
    if name == "gsm8k":
        return GSM8K(data)
    if name == "math500":
        return Math500(data)
    if name == "arith":
        return Arith(digits=digits, steps=steps, count=count, seed=seed, ops=ops)
    if name == "arith-easy":
        return Arith(digits=1, steps=1, count=count, seed=seed, ops=ops)
    raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
