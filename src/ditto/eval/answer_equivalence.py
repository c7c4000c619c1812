"""Answer equivalence: normalisation, the numeric/string fallback checker, Math-Verify, and vote keys.

* Math-Verify (huggingface ``math_verify``), the reference checker: ``verify(parse(gold), parse(pred))``,
  gold first (it is asymmetric). Its own ``signal.alarm`` timeouts are switched off; ditto enforces
  the deadline from outside instead (ditto.eval.grading.GraderPool).
* a normalised numeric/string fallback (Qwen2.5-Math style): numbers compared with relative
  tolerance 1e-4 (fractions, decimals, percentages, thousands separators, units stripped),
  tuples/intervals element-wise, sets order-free, anything else as a normalised string.

Imports only the standard library: the grading worker (ditto.eval.grading_worker) loads it without torch.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

FALLBACK_RTOL = 1e-4

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


def _quiet_math_verify() -> None:
    """Keep Math-Verify's warnings ("Timeout is disabled ...": ditto enforces the deadline itself) and its
    parser's complaints about model output off the user's terminal; errors still show."""
    import logging

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def math_verify_equal(gold: str, pred: str | None) -> bool | None:
    """Math-Verify's verdict, or None when it could not parse one side (or is not installed)."""
    if pred is None:
        return None
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return None
    _quiet_math_verify()
    g, p = _mv_prepare(gold, pred)
    try:
        gp = parse("\\boxed{" + g + "}", parsing_timeout=None)
        pp = parse("\\boxed{" + p + "}", parsing_timeout=None)
        if not gp or not pp:
            return None
        return bool(verify(gp, pp, timeout_seconds=None))
    except Exception:
        return None
