"""Synthetic arithmetic word problems from number-independent templates (InfinityMATH style).

Every template is a story whose numbers are free; a problem is the story with fresh numbers and its
answer is computed by running the problem's *program* (a list of operations), never by hand. Knobs:

* ``digits``: how many digits every operand has (1 -> 2..9, 2 -> 10..99, ...; multipliers one digit shorter)
* ``steps``: how many operations follow the starting quantity
* ``ops``: which operations may appear ("+", "-", "*")
* ``seed``: problem i of a level depends only on (seed, digits, steps, ops, i), so ``--limit`` and
  resumption never change a problem.

The easy level ``digits=1, steps=1`` is the one small models (SmolLM2-135M) solve 20-80% of the time.
"""

from __future__ import annotations

import ast
import operator
import random

from ditto.eval.tasks.base import Problem, Task

NAMES = [
    ("Tom", "He", "his"),
    ("Anna", "She", "her"),
    ("Ravi", "He", "his"),
    ("Mia", "She", "her"),
    ("Lena", "She", "her"),
    ("Omar", "He", "his"),
    ("Sofia", "She", "her"),
    ("Ken", "He", "his"),
]
OBJECTS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards"]

STORIES = [
    {
        "id": "have",
        "start": "{name} has {a} {obj}.",
        "+": ["{pron} buys {x} more {obj}.", "{pron} finds {x} more {obj}.", "A friend gives {poss} {x} more {obj}."],
        "-": ["{pron} gives away {x} {obj}.", "{pron} loses {x} {obj}.", "{pron} sells {x} {obj}."],
        "*": ["{pron} collects more until {pron_l} has {x} times as many {obj} as before."],
        "question": "How many {obj} does {name} have now?",
    },
    {
        "id": "box",
        "start": "A box contains {a} {obj}.",
        "+": ["Someone puts {x} more {obj} into the box.", "{name} adds {x} {obj} to the box."],
        "-": ["{name} takes {x} {obj} out of the box.", "{x} {obj} are removed from the box."],
        "*": ["The number of {obj} in the box is then multiplied by {x}."],
        "question": "How many {obj} are in the box now?",
    },
    {
        "id": "shop",
        "start": "A shop had {a} {obj} in the morning.",
        "+": ["A delivery brought {x} more {obj}.", "The owner made {x} more {obj}."],
        "-": ["Customers bought {x} {obj}.", "{name} bought {x} {obj}."],
        "*": ["By evening the stock had grown to {x} times as many {obj}."],
        "question": "How many {obj} does the shop have at the end of the day?",
    },
    {
        "id": "bare",
        "start": None,  # "What is 3 + 4 - 2?"
        "question": None,
    },
]

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def run_program(program: list[list]) -> int:
    """The answer of a problem: start value, then each (op, operand) in order."""
    value = program[0][1]
    for op, x in program[1:]:
        value = _OPS[op](value, x)
    return value


def eval_expression(expr: str) -> int:
    """Evaluate an integer +, -, * expression safely (used to re-check answers)."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return _AST_OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression node {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval"))


def format_number(n: int | float, thousands: bool = False) -> str:
    """Decimal text of n; with thousands=True digits are grouped in threes from the right: 1,234,567."""
    if not thousands:
        return str(n)
    if isinstance(n, float):
        whole, _, frac = repr(n).partition(".")
        return f"{int(whole):,}" + (f".{frac}" if frac else "")
    return f"{n:,}"


def _lo(digits: int) -> int:
    return 2 if digits == 1 else 10 ** (digits - 1)


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(_lo(digits), 10**digits - 1)


def make_program(rng: random.Random, digits: int, steps: int, ops: str) -> list[list]:
    program: list[list] = [["start", _operand(rng, digits)]]
    value = program[0][1]
    for _ in range(steps):
        op = rng.choice(ops)
        # multipliers are one digit shorter (2-9 up to 2 digits)
        x = _operand(rng, max(1, digits - 1)) if op == "*" else _operand(rng, digits)
        if op == "-" and x > value:
            if value >= _lo(digits):
                x = rng.randint(_lo(digits), value)
            else:
                op = "+"
        program.append([op, x])
        value = _OPS[op](value, x)
    return program


def expression_of(program: list[list]) -> str:
    expr = str(program[0][1])
    for op, x in program[1:]:
        if op == "*" and any(o in expr for o in "+-"):
            expr = f"({expr})"
        expr = f"{expr} {op} {x}"
    return expr


def render(program: list[list], rng: random.Random, story: dict) -> str:
    if story["start"] is None:
        pretty = expression_of(program).replace("*", "×")
        return f"What is {pretty}?"
    name, pron, poss = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    fields = {"name": name, "pron": pron, "pron_l": pron.lower(), "poss": poss, "obj": obj}
    sentences = [story["start"].format(a=program[0][1], **fields)]
    for op, x in program[1:]:
        sentences.append(rng.choice(story[op]).format(x=x, **fields))
    sentences.append(story["question"].format(**fields))
    return " ".join(sentences)


def make_problem(seed: int, digits: int, steps: int, index: int, ops: str = "+-*") -> Problem:
    rng = random.Random(f"ditto-arith-v1:{seed}:{digits}:{steps}:{ops}:{index}")
    story = rng.choice(STORIES)
    program = make_program(rng, digits, steps, ops)
    question = render(program, rng, story)
    answer = run_program(program)
    return Problem(
        id=f"arith-d{digits}-st{steps}-{seed}-{index:05d}",
        question=question,
        answer=str(answer),
        difficulty=f"d{digits}s{steps}",
        meta={
            "program": program,
            "expression": expression_of(program),
            "template": story["id"],
            "digits": digits,
            "steps": steps,
            "ops": ops,
        },
    )


def _as_list(v) -> list[int]:
    if isinstance(v, int):
        return [v]
    if isinstance(v, str):
        out = []
        for part in v.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
        return out
    return [int(x) for x in v]


class Arith(Task):
    """Generated problems: `count` per (digits, steps) level, levels interleaved so --limit stays mixed."""

    name = "arith"

    def __init__(self, digits=1, steps=1, count: int = 200, seed: int = 0, ops: str = "+-*"):
        self.digits = _as_list(digits)
        self.steps = _as_list(steps)
        if not self.digits or min(self.digits) < 1 or not self.steps or min(self.steps) < 1:
            raise ValueError("arith: digits and steps must be >= 1")
        if not ops or set(ops) - set("+-*"):
            raise ValueError("arith: ops must be a non-empty subset of '+-*'")
        self.count, self.seed, self.ops = int(count), int(seed), ops

    def problems(self) -> list[Problem]:
        levels = [(d, s) for d in self.digits for s in self.steps]
        return [make_problem(self.seed, d, s, i, self.ops) for i in range(self.count) for d, s in levels]

    def info(self) -> dict:
        return {
            "name": self.name,
            "generator": "ditto-arith-v1",
            "digits": self.digits,
            "steps": self.steps,
            "count_per_level": self.count,
            "seed": self.seed,
            "ops": self.ops,
        }
