"""Answer extraction and equivalence on a table of hand-checked cases; the grader's timeout pool."""

from __future__ import annotations

import time

import pytest

from ditto.eval.grading import (
    GraderPool,
    answer_key,
    extract_answer,
    fallback_equal,
    grade_answer,
    grade_response,
    normalize_answer,
    parse_number,
)

# (gold, model response, correct?)  -- each checked by hand
CASES = [
    # plain integers and extraction styles
    ("72", "48 + 24 = 72. The answer is 72.", True),
    ("72", "So she sold 72 clips.\n#### 72", True),
    ("72", "The answer is 71.", False),
    ("72", "Total = 48 + 24 = 72", True),
    ("72", "First 48, then 24, so 48+24 = 73", False),
    ("18", "She makes $18 every day. The answer is $18.", True),
    ("18", "The final answer is $18$", True),
    ("18", "The final answer is $\\boxed{18}$.", True),
    ("5", "\\boxed{5}", True),
    ("5", "We get \\boxed{4} but wait, \\boxed{5}", True),
    ("5", "We get \\boxed{5} but wait, \\boxed{4}", False),
    ("5", "\\boxed 5", True),
    ("5", "the answer is: 5", True),
    ("5", "THE ANSWER IS 5.", True),
    ("5", "I don't know.", False),
    ("5", "", False),
    # thousands separators
    ("1234", "The answer is 1,234.", True),
    ("1234567", "\\boxed{1,234,567}", True),
    ("1234567", "The answer is 1,234,568.", False),
    ("1000", "It costs $1,000 in total.", True),
    ("1234", "\\boxed{1{,}234}", True),
    # negative numbers
    ("-3", "The answer is -3.", True),
    ("-3", "The answer is 3.", False),
    ("-3", "\\boxed{-3}", True),
    ("-7", "x = -7, so the answer is -7", True),
    # decimals vs fractions
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "The answer is 0.5", True),
    ("\\frac{1}{2}", "\\boxed{1/2}", True),
    ("\\frac{1}{3}", "\\boxed{0.333333}", True),
    ("\\frac{1}{3}", "\\boxed{0.3}", False),
    ("\\frac{2}{3}", "\\boxed{\\dfrac{2}{3}}", True),
    ("\\frac{2}{3}", "\\boxed{\\tfrac23}", True),
    ("\\frac{2}{3}", "\\boxed{\\frac{3}{2}}", False),
    ("\\frac{3}{4}", "\\boxed{\\frac{6}{8}}", True),
    ("2.5", "The answer is 2.50.", True),
    ("2.5", "The answer is 2.05.", False),
    ("10", "\\boxed{10.0}", True),
    ("-\\frac{1}{2}", "\\boxed{-0.5}", True),
    ("-\\frac{1}{2}", "\\boxed{\\frac{-1}{2}}", True),
    # LaTeX
    ("\\frac{\\pi}{2}", "\\boxed{\\dfrac{\\pi}{2}}", True),
    ("\\frac{\\pi}{2}", "\\boxed{\\pi}", False),
    ("\\sqrt{2}", "\\boxed{\\sqrt 2}", True),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", True),
    ("2\\sqrt{3}", "\\boxed{3\\sqrt{2}}", False),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", True),
    ("p - q", "\\boxed{p-q}", True),
    ("p - q", "\\boxed{q-p}", False),
    # units
    ("3", "\\boxed{3 \\text{ cm}}", True),
    ("12", "The answer is 12 apples.", True),
    ("90", "\\boxed{90^\\circ}", True),
    ("90", "\\boxed{90^{\\circ}}", True),
    ("5", "\\boxed{5\\text{ dollars}}", True),
    ("5", "\\boxed{6\\text{ dollars}}", False),
    # percentages
    ("50", "\\boxed{50\\%}", True),
    ("25", "The answer is 25%.", True),
    ("25", "The answer is 26%.", False),
    # intervals
    ("(1,2]", "\\boxed{(1,2]}", True),
    ("(1,2]", "\\boxed{(1,2)}", False),
    ("[-1, 3)", "\\boxed{[-1,3)}", True),
    ("(-\\infty, 0)", "\\boxed{(-\\infty,0)}", True),
    ("(-\\infty, 0)", "\\boxed{(0, \\infty)}", False),
    # sets and lists
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", True),
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}", False),
    ("-3, 3", "\\boxed{3, -3}", True),
    ("-3, 3", "\\boxed{3}", False),
    # tuples / points
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", True),
    ("(1, 2)", "\\boxed{(2, 1)}", False),
    # equations
    ("2", "\\boxed{x = 2}", True),
    ("2", "\\boxed{x = 3}", False),
    # text answers
    ("\\text{(C)}", "\\boxed{\\text{(C)}}", True),
    ("\\text{Monday}", "The answer is \\boxed{\\text{Monday}}", True),
    ("\\text{Monday}", "The answer is \\boxed{\\text{Tuesday}}", False),
]


@pytest.mark.parametrize("gold,response,expected", CASES)
def test_grading_table(gold, response, expected):
    g = grade_response(gold, response)
    assert g.correct is expected, (gold, response, g)


def test_table_size():
    assert len(CASES) >= 60


@pytest.mark.parametrize(
    "text,answer,method",
    [
        ("so the final answer is $\\frac{1}{2}$. Done", "\\frac{1}{2}", "final_answer_is"),
        ("blah \\boxed{\\frac{a}{b}} blah", "\\frac{a}{b}", "boxed"),
        ("The answer is 3.5.", "3.5", "answer_is"),
        ("The answer is 1,234.", "1,234", "answer_is"),
        ("work...\n#### 1,000", "1,000", "gsm8k_hashes"),
        ("I think 3 then 4 then -12.5", "-12.5", "last_number"),
        ("no digits", None, "none"),
    ],
)
def test_extraction(text, answer, method):
    assert extract_answer(text) == (answer, method)


def test_normalisation_and_numbers():
    assert normalize_answer("\\$ 1,000") == "1,000"
    assert normalize_answer("\\left( 3, \\dfrac{\\pi}{2} \\right)") == "(3,\\frac{\\pi}{2})"
    assert parse_number("1,234.5") == parse_number("1234.5")
    assert parse_number("\\frac{3}{4}") == parse_number("0.75")
    assert parse_number("50%") == 50
    assert parse_number("abc") is None
    assert fallback_equal("1/3", "0.33333")
    assert not fallback_equal("1/3", "0.33")
    assert answer_key("1,000") == answer_key("1000.0") == "1000"
    assert answer_key("\\frac{1}{2}") == answer_key("0.5")


def test_disagreement_is_recorded():
    # the fallback compares order-free lists; math-verify treats "1, 2" vs "2, 1" as equal sets too, while
    # for a symbolic answer only math-verify sees the equality: (x+1)^2 == x^2+2x+1
    g = grade_answer("x^2+2x+1", "(x+1)^2")
    assert g.correct and g.math_verify is True and g.fallback is False and g.disagreement


def test_pool_grades_in_order():
    with GraderPool(workers=2, timeout=20) as pool:
        gs = pool.grade([(gold, resp) for gold, resp, _ in CASES[:12]])
    assert [g.correct for g in gs] == [e for _, _, e in CASES[:12]]


def test_hanging_grader_times_out_and_pool_recovers(monkeypatch):
    # a real pathological input: sympy tries to evaluate a power tower and never returns
    monkeypatch.setenv("DITTO_GRADER_TEST_HANG", "@@hang@@")  # and a test-only hook that sleeps
    jobs = [
        ("3", "The answer is \\boxed{9^{9^{9^{9}}}}"),
        ("4", "\\boxed{4}"),
        ("5", "@@hang@@ 5"),
        ("6", "\\boxed{6}"),
    ]
    t0 = time.monotonic()
    with GraderPool(workers=2, timeout=1.5) as pool:
        gs = pool.grade(jobs)
        assert pool.timeouts == 2 and pool.restarts == 2
        again = pool.grade([("7", "\\boxed{7}")])  # replaced workers still work
    assert time.monotonic() - t0 < 30
    assert [g.status for g in gs] == ["timeout", "ok", "timeout", "ok"]
    assert [g.correct for g in gs] == [False, True, False, True]
    assert gs[0].extracted == "9^{9^{9^{9}}}"
    assert again[0].correct


def test_math_verify_warnings_stay_off_the_terminal():
    """Math-Verify logs "Timeout is disabled ..." on its first call without a timeout (ditto enforces the
    deadline itself); a fresh process must print nothing of it."""
    import subprocess
    import sys

    code = (
        "from ditto.eval.answer_equivalence import math_verify_equal\n"
        "print(math_verify_equal('\\\\frac{1}{2}', '0.5'), math_verify_equal('x^2', 'x**2+'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "True"  # Math-Verify did run
    assert "Timeout is disabled" not in proc.stderr and proc.stderr.strip() == "", proc.stderr
