"""Code-using strategies: tool-integrated reasoning (with PruneTIR's pruning rules), program of
thought, and code-based self-verification with verification-weighted voting.

The model writes ```python blocks; the sandbox runs them; the output is appended as an ```output
block and generation continues.  PruneTIR rules (ToolSession):
  1. once a call succeeds, earlier failed calls (their turn text and output) leave the context;
  2. after `stuck_k` consecutive failed turns, they are dropped and the turn is resampled;
  3. after `suspend_r` failures in all, the tool is suspended: no more executions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ditto.sampling import SamplingParams
from ditto.strategies.base import (
    BudgetExhausted,
    Meter,
    Strategy,
    derive_seed,
    extract_answer,
    majority_vote,
    register,
)
from ditto.strategies.sandbox import SandboxLimits, SandboxResult, run_code

OUTPUT_STOP = "```output"
TIR_INSTRUCTION = (
    "{problem}\nSolve the problem by reasoning step by step. You may write Python code in ```python blocks; "
    "its output will be shown in an ```output block. Put your final answer within \\boxed{{}}."
)
POT_INSTRUCTION = (
    "{problem}\nWrite a Python program in a ```python block that solves the problem and prints only the final answer."
)
VERIFY_INSTRUCTION = (
    "Problem: {problem}\nProposed answer: {answer}\nWrite Python code in a ```python block that checks whether the "
    "proposed answer is correct and prints True or False."
)
# One worked example of each protocol, shown as an earlier chat turn (shots=1, the default): small
# models rarely write a code block from the instruction alone. A made-up problem, in no eval set.
DEMO_PROBLEM = "A baker fills 7 trays with 12 rolls each and sells 9 rolls. How many rolls are left?"
DEMO_ANSWER = "75"
TIR_DEMO = (
    "I will compute it with Python.\n```python\nrolls = 7 * 12 - 9\nprint(rolls)\n```\n```output\n75\n```\n"
    "The baker has 75 rolls left. The final answer is \\boxed{75}."
)
POT_DEMO = "```python\ntrays = 7\nrolls_per_tray = 12\nsold = 9\nprint(trays * rolls_per_tray - sold)\n```"
VERIFY_DEMO = "```python\nprint(7 * 12 - 9 == 75)\n```"
SUSPEND_NOTE = "\n(The Python tool is no longer available; continue reasoning without code.)\n"

_CODE_RE = re.compile(r"```python[ \t]*\n(.*?)(?:```|\Z)", re.S)


def protocol_prompt(backend, instruction: str, demo: str | None, **fields) -> str:
    """The chat prompt of a tool protocol: `instruction` filled with `fields`, after one worked example
    (the demo problem and `demo` as the assistant's turn) unless demo is None."""
    messages = []
    if demo is not None:
        demo_fields = {k: DEMO_ANSWER if k == "answer" else DEMO_PROBLEM for k in fields}
        messages += [
            {"role": "user", "content": instruction.format(**demo_fields)},
            {"role": "assistant", "content": demo},
        ]
    messages.append({"role": "user", "content": instruction.format(**fields)})
    return backend.chat_prompt(messages)


def extract_code(text: str, allow_bare: bool = False) -> str | None:
    """The last ```python block (an unterminated final block counts); optionally the whole text."""
    blocks = _CODE_RE.findall(text)
    if blocks:
        return blocks[-1]
    return text if allow_bare and text.strip() else None


def tool_output_text(r: SandboxResult, max_chars: int = 2000) -> str:
    if r.ok:
        out = r.stdout
    elif r.timed_out:
        out = r.stdout + "TimeoutError: execution timed out"
    else:
        lines = r.stderr.strip().splitlines()
        out = r.stdout + (lines[-1] if lines else f"Error (exit status {r.returncode})")
    out = out.rstrip("\n")
    if len(out) > max_chars:
        out = out[: max_chars // 2] + "\n...\n" + out[-max_chars // 2 :]
    return out


def output_block(r: SandboxResult) -> str:
    return f"```output\n{tool_output_text(r)}\n```\n"


@dataclass
class Segment:
    text: str  # model-written text of the turn (including its code block)
    output: str = ""  # the ```output block appended after it ("" when no call)
    ok: bool | None = None  # None: no tool call in this turn


@dataclass
class ToolSession:
    """The transcript of one tool-integrated solution and PruneTIR's bookkeeping."""

    stuck_k: int = 2
    suspend_r: int = 4
    limits: SandboxLimits = field(default_factory=lambda: SandboxLimits(timeout_s=5.0, cpu_s=5))
    prune: bool = True
    segments: list[Segment] = field(default_factory=list)
    failures: int = 0
    consecutive_failures: int = 0
    suspended: bool = False
    pruned: int = 0
    resamples: int = 0
    runs: int = 0

    def context(self) -> str:
        return "".join(s.text + s.output for s in self.segments)

    def add_turn(self, text: str, wants_output: bool) -> str:
        """Record one model turn. Returns "final", "executed" or "resample"."""
        code = extract_code(text) if wants_output else None
        if code is None or self.suspended:
            self.segments.append(Segment(text))
            return "final"
        r = run_code(code, self.limits)
        self.runs += 1
        seg = Segment(text, output_block(r), r.ok)
        if r.ok:
            self.consecutive_failures = 0
            if self.prune:  # rule 1: a success retires the failed calls before it
                before = len(self.segments)
                self.segments = [s for s in self.segments if s.ok is not False]
                self.pruned += before - len(self.segments)
            self.segments.append(seg)
            return "executed"
        self.failures += 1
        self.consecutive_failures += 1
        self.segments.append(seg)
        if self.prune and self.failures >= self.suspend_r:  # rule 3: suspend the tool
            self.suspended = True
            self.segments.append(Segment(SUSPEND_NOTE))
            return "executed"
        if self.prune and self.consecutive_failures >= self.stuck_k:  # rule 2: drop and resample
            self.segments = self.segments[: -self.stuck_k]
            self.pruned += self.stuck_k
            self.consecutive_failures = 0
            self.resamples += 1
            return "resample"
        return "executed"


@register("tool_integrated")
class ToolIntegrated(Strategy):
    instruction = TIR_INSTRUCTION
    uses_task_prompt = False  # the tool protocol's own instruction

    def __init__(
        self,
        max_turns: int = 6,
        stuck_k: int = 2,
        suspend_r: int = 4,
        prune: bool = True,
        temperature: float = 0.0,
        seed: int = 0,
        limits: SandboxLimits | None = None,
        shots: int = 1,
    ):
        self.max_turns = max_turns
        self.stuck_k = stuck_k
        self.suspend_r = suspend_r
        self.prune = prune
        self.temperature = temperature
        self.seed = seed
        self.limits = limits or SandboxLimits(timeout_s=5.0, cpu_s=5)
        self.shots = _shots(shots)

    def solve(self, problem: str, meter: Meter, trace: dict, sample: int = 0) -> str:
        prompt = protocol_prompt(meter.policy, self.instruction, TIR_DEMO if self.shots else None, problem=problem)
        session = ToolSession(self.stuck_k, self.suspend_r, self.limits, self.prune)
        turns = []
        for turn in range(self.max_turns):
            stop = () if session.suspended else (OUTPUT_STOP,)
            # resampled turns need fresh randomness: a greedy policy is nudged to temperature 0.7
            temperature = self.temperature if session.resamples == 0 or self.temperature > 0 else 0.7
            params = SamplingParams(
                temperature=temperature,
                seed=derive_seed(self.seed, sample, turn),
                max_tokens=meter.budget.max_tokens,
                stop=stop,
            )
            try:
                (c,) = meter.generate([prompt + session.context()], params)[0]
            except BudgetExhausted:
                trace["budget_exhausted"] = turn
                break
            wants_output = c.finish_reason == "stop" and c.stop_reason == OUTPUT_STOP
            runs_before = session.runs
            action = session.add_turn(c.text, wants_output)
            meter.sandbox_runs += session.runs - runs_before
            turns.append(action)
            if action == "final":
                break
        trace.setdefault("sessions", []).append(
            {
                "turns": turns,
                "runs": session.runs,
                "failures": session.failures,
                "pruned": session.pruned,
                "resamples": session.resamples,
                "suspended": session.suspended,
            }
        )
        return session.context()

    def _run(self, problem: str, meter: Meter, trace: dict):
        text = self.solve(problem, meter, trace)
        return extract_answer(text), text


def _shots(shots: int) -> int:
    if shots not in (0, 1):
        raise ValueError(f"shots must be 0 (instruction only) or 1 (one worked example first), got {shots!r}")
    return shots


def answer_from_stdout(stdout: str) -> str | None:
    lines = [ln.strip() for ln in stdout.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def program_answer(stdout: str) -> str | None:
    """The answer a program printed: its last line, or the answer inside it when that line is prose
    ("The final answer is: 12 stamps" -> "12"); "x = 5" or "sqrt(2)" are kept as printed."""
    last = answer_from_stdout(stdout)
    if last is not None and " " in last and re.search(r"\b[A-Za-z]{3,}\b", last):
        return extract_answer(last) or last
    return last


@register("program_of_thought")
class ProgramOfThought(Strategy):
    """The model writes one program; its last printed line is the answer (majority over n)."""

    instruction = POT_INSTRUCTION
    uses_task_prompt = False  # the tool protocol's own instruction

    def __init__(
        self,
        n: int = 1,
        temperature: float = 0.0,
        seed: int = 0,
        limits: SandboxLimits | None = None,
        shots: int = 1,
    ):
        self.n = n
        self.temperature = temperature
        self.seed = seed
        self.limits = limits or SandboxLimits(timeout_s=5.0, cpu_s=5)
        self.shots = _shots(shots)

    def _run(self, problem: str, meter: Meter, trace: dict):
        n = meter.samples(self.n)
        prompt = protocol_prompt(meter.policy, self.instruction, POT_DEMO if self.shots else None, problem=problem)
        params = SamplingParams(
            n=n,
            temperature=self.temperature if n == 1 else max(self.temperature, 0.7),
            seed=self.seed,
            max_tokens=meter.budget.max_tokens,
        )
        outs = meter.generate([prompt], params)[0]
        answers, runs = [], []
        for c in outs:
            code = extract_code(c.text, allow_bare=True)
            if code is None:
                answers.append(None)
                runs.append(None)
                continue
            r = run_code(code, self.limits)
            meter.sandbox_runs += 1
            answers.append(program_answer(r.stdout) if r.ok else None)
            runs.append({"ok": r.ok, "killed_reason": r.killed_reason})
        vote = majority_vote(answers)
        trace["answers"] = answers
        trace["runs"] = runs
        text = next((c.text for c, a in zip(outs, answers) if a == vote.answer), outs[0].text)
        return vote.answer, text


VERDICT_WEIGHTS = {"true": 1.0, "uncertain": 0.5, "false": 0.2}


def parse_verdict(r: SandboxResult | None) -> str:
    if r is None or not r.ok:
        return "uncertain"
    last = answer_from_stdout(r.stdout)
    if last is None:
        return "uncertain"
    low = last.lower()
    if low in ("true", "yes", "correct"):
        return "true"
    if low in ("false", "no", "incorrect"):
        return "false"
    return "uncertain"


@register("code_self_verification")
class CodeSelfVerification(Strategy):
    """Sample n solutions (tool-integrated), verify each distinct answer with model-written code,
    and vote with weights w_true > w_uncertain > w_false."""

    instruction = TIR_INSTRUCTION
    uses_task_prompt = False  # the tool protocol's own instruction

    def __init__(
        self,
        n: int = 4,
        temperature: float = 0.7,
        seed: int = 0,
        max_turns: int = 3,
        weights: dict | None = None,
        limits: SandboxLimits | None = None,
        shots: int = 1,
    ):
        self.n = n
        self.temperature = temperature
        self.seed = seed
        self.max_turns = max_turns
        self.weights = dict(weights or VERDICT_WEIGHTS)
        if not self.weights["true"] > self.weights["uncertain"] > self.weights["false"] >= 0:
            raise ValueError("weights must satisfy w_true > w_uncertain > w_false >= 0")
        self.limits = limits or SandboxLimits(timeout_s=5.0, cpu_s=5)
        self.shots = _shots(shots)

    def _run(self, problem: str, meter: Meter, trace: dict):
        tir = ToolIntegrated(
            max_turns=self.max_turns, temperature=self.temperature, seed=self.seed, limits=self.limits, shots=self.shots
        )
        texts, answers = [], []
        for i in range(meter.samples(self.n)):
            try:
                text = tir.solve(problem, meter, trace, sample=i)
            except BudgetExhausted:
                break
            texts.append(text)
            answers.append(extract_answer(text))
        verdicts: dict[str, str] = {}
        for a in answers:
            if a is None or a in verdicts:
                continue
            demo = VERIFY_DEMO if self.shots else None
            prompt = protocol_prompt(meter.policy, VERIFY_INSTRUCTION, demo, problem=problem, answer=a)
            try:
                verify = SamplingParams(temperature=0.0, seed=0, max_tokens=meter.budget.max_tokens)
                (c,) = meter.generate([prompt], verify)[0]
            except BudgetExhausted:
                verdicts[a] = "uncertain"
                continue
            code = extract_code(c.text)
            r = None
            if code is not None:
                r = run_code(code, self.limits)
                meter.sandbox_runs += 1
            verdicts[a] = parse_verdict(r)
        w = [self.weights[verdicts[a]] if a is not None else 0.0 for a in answers]
        vote = majority_vote(answers, w)
        trace["answers"] = answers
        trace["verdicts"] = verdicts
        trace["votes"] = vote.groups
        text = next((t for t, a in zip(texts, answers) if a == vote.answer), texts[0] if texts else "")
        return vote.answer, text
