"""Grading: extract a final answer from a model's text and decide whether it equals the gold answer.

Two checkers look at every answer:

* Math-Verify (huggingface ``math_verify``), the reference checker: ``verify(parse(gold), parse(pred))``,
  gold first (it is asymmetric). Its own ``signal.alarm`` timeouts are switched off; ditto enforces
  the deadline from outside instead.
* a normalised numeric/string fallback (Qwen2.5-Math style): numbers compared with relative
  tolerance 1e-4 (fractions, decimals, percentages, thousands separators, units stripped),
  tuples/intervals element-wise, sets order-free, anything else as a normalised string.

The verdict is Math-Verify's whenever it could parse both sides, else the fallback's. When the two
disagree the record says so (``disagreement``) and the runner logs it.

Every grading call runs in a worker process of a :class:`GraderPool` with a wall-clock deadline:
a hung call (sympy can spin for ever on e.g. ``9^{9^{9^{9}}}``) gets its worker killed and
replaced, and the answer is recorded with ``status="timeout"`` (counted as wrong). Nothing hangs.

Extraction order (first that matches): "final answer is $...$", the last ``\\boxed{}``/``\\fbox{}``,
"the answer is ...", GSM8K ``#### ...``, the last number in the text.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import selectors
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from fractions import Fraction

GRADER_VERSION = "ditto-grader-1"
FALLBACK_RTOL = 1e-4
DEFAULT_TIMEOUT_S = 10.0

# ----------------------------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}, or \\boxed x) with balanced braces."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0:
                best = text[i + 1 : j]
        else:  # "\boxed 5"
            m2 = re.match(r"[^\s$]+", text[i:])
            if m2:
                best = m2.group(0)
    return best


def _clean_tail(ans: str) -> str:
    ans = ans.strip()
    ans = re.sub(r"^[:\s]+", "", ans)
    ans = ans.strip().rstrip(".").strip()
    if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
        ans = ans.strip("$").strip()
    return ans


def extract_answer(text: str) -> tuple[str | None, str]:
    """Final answer of a model response: (answer or None, method used)."""
    if text is None:
        return None, "none"
    m = list(re.finditer(r"final answer is\s*:?\s*\$([^$]+)\$", text, flags=re.I))
    if m:
        return _clean_tail(m[-1].group(1)), "final_answer_is"
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return _clean_tail(boxed), "boxed"
    m = list(re.finditer(r"the (?:final )?answer is\s*:?\s*([^\n]+)", text, flags=re.I))
    if m:
        tail = m[-1].group(1).strip()
        if tail.startswith("$"):
            inner = re.match(r"\$([^$]+)\$", tail)
            if inner:
                return _clean_tail(inner.group(1)), "answer_is"
        # up to the end of the sentence: a period followed by a space/end (not a decimal point)
        tail = re.split(r"\.(?:\s|$)", tail)[0]
        num = _NUMBER_RE.search(tail)
        if num and not re.search(r"\\|[{}()\[\]]", tail):
            return num.group(0), "answer_is"
        if tail.strip():
            return _clean_tail(tail), "answer_is"
    m = list(re.finditer(r"####\s*([^\n]+)", text))
    if m:
        return _clean_tail(m[-1].group(1)), "gsm8k_hashes"
    nums = _NUMBER_RE.findall(text)
    if nums:
        return nums[-1], "last_number"
    return None, "none"


# ----------------------------------------------------------------------------------------------
# normalisation and the fallback checker
# ----------------------------------------------------------------------------------------------

_UNIT_WORDS = (
    "dollars?|cents?|units?|meters?|metres?|cm|mm|km|m|kg|g|grams?|pounds?|lbs?|inch(?:es)?|feet|foot|ft|"
    "miles?|hours?|minutes?|seconds?|mins?|days?|weeks?|months?|years?|degrees?|sq|square|cubic|"
    "students?|people|apples?|books?|items?"
)


def normalize_answer(ans: str) -> str:
    """Canonical text of an answer: no $, \\left/\\right, spacing macros, \\text{units}, degree signs..."""
    s = ans.strip()
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ").replace("~", " ")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)\b", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.replace("\\%", "%").replace("{,}", ",")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{\s*(" + _UNIT_WORDS + r")\s*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+(?:" + _UNIT_WORDS + r")\b\.?$", "", s.strip())
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=[-\d\\.(])", "", s.strip())  # "x = 3" -> "3"
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return s


def parse_number(s: str) -> Fraction | float | None:
    """Numeric value of a normalised answer, or None: handles 1,234  -3.5  \\frac{a}{b}  a/b  50%  .5"""
    t = s.strip()
    if t.endswith("%"):
        t = t[:-1]
    t = t.strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", t)
    if m:
        try:
            val = Fraction(m.group(2)) / Fraction(m.group(3))
        except (ValueError, ZeroDivisionError):
            return None
        return -val if m.group(1) else val
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", t)
    if m:
        try:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        except ZeroDivisionError:
            return None
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", t):
        return Fraction(t)
    if re.fullmatch(r"-?\d+(\.\d+)?[eE][-+]?\d+", t):
        return float(t)
    return None


def _num_equal(a, b) -> bool:
    if a == b:
        return True
    a, b = float(a), float(b)
    return math.isclose(a, b, rel_tol=FALLBACK_RTOL, abs_tol=1e-9)


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _atom_equal(g: str, p: str) -> bool:
    if g == p:
        return True
    gn, pn = parse_number(g), parse_number(p)
    if gn is not None and pn is not None:
        return _num_equal(gn, pn)
    return False


def fallback_equal(gold: str, pred: str | None) -> bool:
    """The normalised numeric/string checker."""
    if pred is None:
        return False
    g, p = normalize_answer(gold), normalize_answer(pred)
    if not p:
        return False
    if _atom_equal(g, p):
        return True
    # sets: \{a, b\} order-free
    sm_g = re.fullmatch(r"\\\{(.*)\\\}", g)
    sm_p = re.fullmatch(r"\\\{(.*)\\\}", p)
    if sm_g and sm_p:
        ge, pe = _split_top(sm_g.group(1)), _split_top(sm_p.group(1))
        return (
            len(ge) == len(pe)
            and all(any(_atom_equal(x, y) for y in pe) for x in ge)
            and all(any(_atom_equal(y, x) for x in ge) for y in pe)
        )
    # tuples / intervals: same brackets, element-wise
    if len(g) >= 2 and len(p) >= 2 and g[0] in "([" and g[-1] in ")]" and (g[0], g[-1]) == (p[0], p[-1]):
        ge, pe = _split_top(g[1:-1]), _split_top(p[1:-1])
        return len(ge) == len(pe) and all(_atom_equal(x, y) for x, y in zip(ge, pe))
    # comma lists without brackets (e.g. "1, 2") compared order-free
    ge, pe = _split_top(g), _split_top(p)
    if len(ge) > 1 and len(ge) == len(pe):
        return sorted(ge) == sorted(pe) or all(any(_atom_equal(x, y) for y in pe) for x in ge)
    return False


def answer_key(ans: str | None) -> str | None:
    """Key for majority voting: equal keys = same answer (numbers by value, the rest as normalised text)."""
    if ans is None:
        return None
    n = normalize_answer(ans)
    if not n:
        return None
    v = parse_number(n)
    if v is not None:
        if isinstance(v, Fraction):
            return str(v) if v.denominator != 1 else str(v.numerator)
        return repr(round(float(v), 9))
    return n


# ----------------------------------------------------------------------------------------------
# Math-Verify
# ----------------------------------------------------------------------------------------------


def _mv_prepare(gold: str, pred: str) -> tuple[str, str]:
    """Strip thousands separators from plain numbers when the gold is a plain number (not a set)."""
    g = gold.strip()
    p = pred.strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", p.replace("\\!", "")) and "," not in g:
        p = p.replace("\\!", "").replace(",", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", g):
        g = g.replace(",", "")
    return g, p


def math_verify_equal(gold: str, pred: str | None) -> bool | None:
    """Math-Verify's verdict, or None when it could not parse one side (or is not installed)."""
    if pred is None:
        return None
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return None
    g, p = _mv_prepare(gold, pred)
    try:
        gp = parse("\\boxed{" + g + "}", parsing_timeout=None)
        pp = parse("\\boxed{" + p + "}", parsing_timeout=None)
        if not gp or not pp:
            return None
        return bool(verify(gp, pp, timeout_seconds=None))
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# one grading call
# ----------------------------------------------------------------------------------------------


@dataclass
class Grade:
    correct: bool
    status: str  # "ok" | "no_answer" | "timeout" | "error"
    extracted: str | None
    method: str
    math_verify: bool | None
    fallback: bool | None
    disagreement: bool
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_TEST_HANG_ENV = "DITTO_GRADER_TEST_HANG"  # test hook: a response containing this marker sleeps for ever


def grade_response(gold: str, response: str, hang_marker: str | None = None) -> Grade:
    """Extract and judge one response (runs inside a worker; may be slow on pathological input).

    `hang_marker` is a test hook: a response containing it, or a gold answer equal to it, sleeps for
    an hour (GraderPool.grade passes $DITTO_GRADER_TEST_HANG here).
    """
    t0 = time.perf_counter()
    if hang_marker and (hang_marker in (response or "") or hang_marker == gold.strip()):
        time.sleep(3600)
    extracted, method = extract_answer(response)
    if extracted is None:
        return Grade(False, "no_answer", None, method, None, None, False, time.perf_counter() - t0)
    return grade_answer(gold, extracted, method, t0)


def grade_answer(gold: str, extracted: str, method: str = "given", t0: float | None = None) -> Grade:
    t0 = time.perf_counter() if t0 is None else t0
    mv = math_verify_equal(gold, extracted)
    fb = fallback_equal(gold, extracted)
    verdict = mv if mv is not None else fb
    return Grade(
        correct=bool(verdict),
        status="ok",
        extracted=extracted,
        method=method,
        math_verify=mv,
        fallback=fb,
        disagreement=mv is not None and mv != fb,
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------------------------
# worker pool with deadlines
# ----------------------------------------------------------------------------------------------


def _stdio_worker() -> None:  # pragma: no cover - runs in the worker process
    """Worker loop: one JSON job per stdin line -> one JSON result per stdout line."""
    with contextlib.suppress(ImportError):  # warm the import before the first deadline starts
        import math_verify  # noqa: F401
    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        job_id, gold, response, marker = json.loads(line)
        try:
            payload = grade_response(gold, response, marker).to_dict()
        except Exception as e:  # noqa: BLE001
            payload = {"__error__": f"{type(e).__name__}: {e}"}
        out.write(json.dumps([job_id, payload]) + "\n")
        out.flush()


class _Worker:
    """A grading worker: a plain `python grading.py --worker` subprocess (this file imports only the
    standard library at top level, so it starts without importing ditto/torch; nothing re-imports the
    caller's __main__, unlike multiprocessing's spawn/forkserver)."""

    def __init__(self):
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-P", os.path.abspath(__file__), "--worker"],  # -P: no script dir on sys.path
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.ready = False
        self.job = None  # (job_id, deadline)

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("grading worker exited")
        return json.loads(line)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


def _wait_readable(workers: list[_Worker], timeout: float) -> list[_Worker]:
    with selectors.DefaultSelector() as sel:
        for w in workers:
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        return [key.data for key, _ in sel.select(timeout=max(0.0, timeout))]


class GraderPool:
    """Worker processes that grade with a per-call deadline; a worker that overruns is killed and replaced.

    Use as a context manager::

        with GraderPool(workers=2, timeout=10) as pool:
            grades = pool.grade([(gold, response), ...])   # list[Grade], same order
    """

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT_S, start_timeout: float = 120.0):
        self.n_workers = max(1, int(workers))
        self.timeout = float(timeout)
        self.start_timeout = start_timeout
        self._workers: list[_Worker] = []
        self.timeouts = 0
        self.restarts = 0

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker())

    def _wait_ready(self, w: _Worker) -> bool:
        if not w.ready and _wait_readable([w], self.start_timeout):
            try:
                w.ready = w.recv() == "ready"
            except (EOFError, ValueError):
                return False
        return w.ready

    def close(self) -> None:
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()
        for w in self._workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=2)
            w.kill()
        self._workers = []

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        self._ensure_workers()

    def grade(self, jobs: list[tuple[str, str]]) -> list[Grade]:
        """Grade (gold, response) pairs; returns one Grade per pair in order."""
        results: list[Grade | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        pending.reverse()
        marker = os.environ.get(_TEST_HANG_ENV) or None
        self._ensure_workers()
        while pending or any(w.job for w in self._workers):
            for w in list(self._workers):
                if w.job is None and pending:
                    if not self._wait_ready(w):
                        self._replace(w)
                        continue
                    jid = pending.pop()
                    try:
                        w.send([jid, jobs[jid][0], jobs[jid][1], marker])
                    except OSError:
                        pending.append(jid)
                        self._replace(w)
                        continue
                    w.job = (jid, time.monotonic() + self.timeout)
            busy = [w for w in self._workers if w.job]
            if not busy:
                continue
            next_deadline = min(w.job[1] for w in busy)
            ready = _wait_readable(busy, next_deadline - time.monotonic())
            for w in busy:
                jid = w.job[0]
                if w in ready:
                    try:
                        got_id, payload = w.recv()
                    except (EOFError, ValueError, OSError):
                        results[jid] = Grade(False, "error", None, "none", None, None, False, 0.0, "worker died")
                        w.job = None
                        self._replace(w)
                        continue
                    w.job = None
                    if "__error__" in payload:
                        err = payload["__error__"]
                        results[got_id] = Grade(False, "error", None, "none", None, None, False, 0.0, err)
                    else:
                        results[got_id] = Grade(**payload)
                elif time.monotonic() >= w.job[1]:
                    self.timeouts += 1
                    extracted, method = extract_answer(jobs[jid][1])
                    results[jid] = Grade(
                        False,
                        "timeout",
                        extracted,
                        method,
                        None,
                        None,
                        False,
                        self.timeout,
                        f"grading exceeded {self.timeout:g}s; worker killed",
                    )
                    w.job = None
                    self._replace(w)
        return results  # type: ignore[return-value]


def grader_info(timeout: float, workers: int) -> dict:
    try:
        from importlib.metadata import version

        mv_version = version("math-verify")
    except Exception:  # noqa: BLE001
        mv_version = None
    return {
        "version": GRADER_VERSION,
        "math_verify": mv_version,
        "fallback": f"normalised numeric (rel_tol {FALLBACK_RTOL}) / string",
        "verdict": "math_verify when it parses both sides, else fallback",
        "extraction": ["final answer is $..$", "last \\boxed{}", "the answer is", "####", "last number"],
        "timeout_s": timeout,
        "workers": workers,
        "timeout_policy": "worker killed and replaced; answer counted wrong with status=timeout",
    }


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _stdio_worker()
