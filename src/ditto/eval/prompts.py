"""Prompt formats for evaluation: zero-shot chat, few-shot (plain or chat) and number formatting.

Formats (``--prompt``):

* ``chat``: one user turn rendered with the model's own chat template (``backend.chat_prompt``);
  the instruction asks for step-by-step work and a final line "The answer is N." (\\boxed for MATH).
* ``fewshot``: plain text "Question: ...\\nAnswer: ..." exemplars, then the question; generation
  stops at the next "Question:". Works for base models.
* ``chat-fewshot``: the same exemplars as earlier user/assistant turns of a chat.
* ``plain``: zero-shot plain text, "Question: ...\\nAnswer:" with no exemplars.

``thousands=True`` rewrites every integer of 5+ digits (and 4-digit ones not in year position)
with commas grouped from the right ("12345" -> "12,345"): the right-to-left comma trick from
"Tokenization counts" (Singh & Strouse 2024), which helps models whose tokenizer chunks digits
left to right. Answers are graded with separators stripped, so scores stay comparable.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

from ditto.eval.tasks.base import Problem

FORMATS = ("chat", "fewshot", "chat-fewshot", "plain")

INSTRUCTIONS = {
    "default": 'Solve the problem step by step. End with a line of the form "The answer is N." '
    "where N is the final number.",
    "math500": "Solve the problem step by step. Put the final answer in \\boxed{}.",
}

# Short worked exemplars written for ditto (not taken from any test set).
EXEMPLARS = {
    "default": [
        (
            "Lily has 3 red balloons and 4 blue balloons. She gives 2 balloons to her brother. "
            "How many balloons does she have left?",
            "Lily has 3 + 4 = 7 balloons. After giving away 2 she has 7 - 2 = 5. The answer is 5.",
        ),
        (
            "A baker makes 12 muffins per tray and bakes 5 trays. He sells 38 muffins. How many muffins are left?",
            "He bakes 12 * 5 = 60 muffins. After selling 38, 60 - 38 = 22 are left. The answer is 22.",
        ),
        (
            "Sam reads 15 pages a day for 6 days and then 10 pages on the seventh day. "
            "How many pages did he read in total?",
            "In 6 days he reads 15 * 6 = 90 pages. Adding the seventh day gives 90 + 10 = 100. The answer is 100.",
        ),
        ("What is 7 + 8 - 6?", "7 + 8 = 15 and 15 - 6 = 9. The answer is 9."),
    ],
    "math500": [
        (
            "What is the value of $\\frac{3}{4} + \\frac{1}{6}$?",
            "The common denominator is 12: $\\frac{9}{12} + \\frac{2}{12} = \\frac{11}{12}$. "
            "The answer is $\\boxed{\\frac{11}{12}}$.",
        ),
        ("Solve for $x$: $2x + 5 = 17$.", "Subtract 5: $2x = 12$, so $x = 6$. The answer is $\\boxed{6}$."),
        (
            "Find all real $x$ with $x^2 = 9$.",
            "Taking square roots, $x = 3$ or $x = -3$. The answer is $\\boxed{-3, 3}$.",
        ),
        ("What is $15\\%$ of $80$?", "$0.15 \\cdot 80 = 12$. The answer is $\\boxed{12}$."),
    ],
}

_YEAR = re.compile(r"(?:in|of|since|year|by|from|until)\s+$", re.I)


def add_thousands_separators(text: str) -> str:
    """Group the digits of integers in `text` by threes from the right with commas.

    Decimal fractions ("3.14159"), numbers already grouped ("1,234") and 4-digit years after
    "in/of/since/..." are left alone.
    """

    def repl(m: re.Match) -> str:
        digits = m.group(0)
        if len(digits) == 4 and _YEAR.search(text[max(0, m.start() - 8) : m.start()]):
            return digits
        return f"{int(digits):,}" if not digits.startswith("0") else digits

    return re.sub(r"(?<![\d.,])\d{4,}(?![\d]|,\d)", repl, text)


@dataclass(frozen=True)
class PromptTemplate:
    """How a Problem becomes a prompt string; recorded whole in manifests."""

    format: str = "chat"
    shots: int = 0  # exemplars for the few-shot formats (0 -> all available)
    thousands: bool = False
    system: str | None = None
    instruction: str | None = None  # None -> per-task default
    extra_stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown prompt format {self.format!r}; choose one of {', '.join(FORMATS)}")

    def _key(self, task: str) -> str:
        return "math500" if task == "math500" else "default"

    def instruction_for(self, task: str) -> str:
        return self.instruction if self.instruction is not None else INSTRUCTIONS[self._key(task)]

    def exemplars_for(self, task: str) -> list[tuple[str, str]]:
        if self.format not in ("fewshot", "chat-fewshot"):
            return []
        ex = EXEMPLARS[self._key(task)]
        ex = ex[: self.shots] if self.shots else ex
        if self.thousands:
            ex = [(add_thousands_separators(q), add_thousands_separators(a)) for q, a in ex]
        return ex

    def stop(self) -> tuple[str, ...]:
        base = ("\nQuestion:", "\n\nQuestion") if self.format in ("fewshot", "plain") else ()
        return base + tuple(self.extra_stop)

    def question_text(self, problem: Problem) -> str:
        return add_thousands_separators(problem.question) if self.thousands else problem.question

    def render(self, problem: Problem, task: str, backend) -> str:
        """The prompt text for `problem` (chat formats use backend.chat_prompt)."""
        q = self.question_text(problem)
        instr = self.instruction_for(task)
        shots = self.exemplars_for(task)
        if self.format in ("fewshot", "plain"):
            parts = [instr, ""] if instr else []
            for eq, ea in shots:
                parts += [f"Question: {eq}", f"Answer: {ea}", ""]
            parts += [f"Question: {q}", "Answer:"]
            return "\n".join(parts)
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        for i, (eq, ea) in enumerate(shots):
            messages.append({"role": "user", "content": f"{instr}\n\n{eq}" if i == 0 else eq})
            messages.append({"role": "assistant", "content": ea})
        messages.append({"role": "user", "content": q if shots else f"{instr}\n\n{q}"})
        return backend.chat_prompt(messages, add_generation_prompt=True)

    def record(self, task: str) -> dict:
        rec = asdict(self)
        rec["extra_stop"] = list(self.extra_stop)
        rec["instruction_text"] = self.instruction_for(task)
        rec["exemplars"] = [list(e) for e in self.exemplars_for(task)]
        rec["stop"] = list(self.stop())
        rec["sha256"] = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()
        return rec
