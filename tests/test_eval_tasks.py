"""Tasks and prompts: arith generator knobs and reproducibility, data lookup, thousands separators."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ditto.eval.prompts import PromptTemplate, add_thousands_separators
from ditto.eval.tasks import get_task
from ditto.eval.tasks.arith import Arith, eval_expression, format_number, make_problem, run_program
from ditto.eval.tasks.base import data_dirs, find_data_file


def test_arith_seeded_reproducible():
    a = Arith(digits="1,2", steps="1-3", count=20, seed=7).problems()
    b = Arith(digits="1,2", steps="1-3", count=20, seed=7).problems()
    c = Arith(digits="1,2", steps="1-3", count=20, seed=8).problems()
    assert [(p.id, p.question, p.answer) for p in a] == [(p.id, p.question, p.answer) for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    assert len(a) == 20 * 6 and len({p.id for p in a}) == len(a)
    # a problem does not depend on how many were generated (limit / resumption safe)
    assert make_problem(7, 2, 3, 5).question == next(p for p in a if p.id == "arith-d2-st3-7-00005").question


def test_arith_answers_recomputed():
    for p in Arith(digits="1-3", steps="1-4", count=15, seed=0).problems():
        prog = p.meta["program"]
        assert str(run_program(prog)) == p.answer
        assert str(eval_expression(p.meta["expression"])) == p.answer
        # every operand of the program is written in the question, in order
        nums = [int(x) for x in re.findall(r"\d+", p.question)]
        assert nums == [x for _, x in prog]
        assert int(p.answer) >= 0


def test_arith_knobs_change_digits_and_steps():
    for d in (1, 2, 3):
        for s in (1, 2, 4):
            for p in Arith(digits=d, steps=s, count=10, ops="+-").problems():
                prog = p.meta["program"]
                assert len(prog) == s + 1 and p.difficulty == f"d{d}s{s}"
                assert all(len(str(x)) == d for _, x in prog)
    muls = [p for p in Arith(digits=1, steps=2, count=50, ops="*").problems()]
    assert all(all(op in ("start", "*") for op, _ in p.meta["program"]) for p in muls)
    with pytest.raises(ValueError):
        Arith(ops="/")


def test_easy_level_is_one_digit_one_step():
    ps = get_task("arith-easy", count=30).load()
    assert all(p.difficulty == "d1s1" and int(p.answer) <= 81 for p in ps)


def test_thousands_separators():
    assert format_number(1234567, thousands=True) == "1,234,567"
    assert format_number(999, thousands=True) == "999"
    assert format_number(-1234, thousands=True) == "-1,234"
    assert format_number(12345.25, thousands=True) == "12,345.25"
    assert format_number(1234567) == "1234567"
    text = "In 2019 Ann paid 1234567 dollars, 3.14159 pi, 1,234 kept, 12345.678 and 99999."
    assert add_thousands_separators(text) == (
        "In 2019 Ann paid 1,234,567 dollars, 3.14159 pi, 1,234 kept, 12,345.678 and 99,999."
    )
    p = make_problem(0, 4, 2, 0, ops="+")
    t = PromptTemplate(format="plain", thousands=True)
    q = t.question_text(p)
    assert all(f"{x:,}" in q for _, x in p.meta["program"])


def test_data_lookup(tmp_path, monkeypatch):
    f = tmp_path / "gsm8k-test.jsonl"
    rows = [{"question": "What is 1000 + 234?", "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert find_data_file(["gsm8k-test.jsonl"], tmp_path) == f
    assert find_data_file(["x"], f) == f
    monkeypatch.setenv("DITTO_DATA", str(tmp_path))
    assert data_dirs()[0] == tmp_path
    probs = get_task("gsm8k").load()
    assert probs[0].answer == "1234" and probs[0].difficulty == 1 and probs[0].id == "gsm8k-00000"
    monkeypatch.setenv("DITTO_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--data"):
        find_data_file(["no-such-file.jsonl"])


def test_bundled_samples_are_the_default_and_nothing_outside_the_package_is_read(monkeypatch, tmp_path):
    import tomllib
    from fnmatch import fnmatch

    import ditto

    monkeypatch.delenv("DITTO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data beside the working folder either
    package = Path(ditto.__file__).parent / "data"
    assert data_dirs() == [package]  # only the package's own folder: ../shared is never looked at
    gsm, math = get_task("gsm8k"), get_task("math500")
    assert gsm.path.parent == math.path.parent == package
    gsm_probs, math_probs = gsm.load(), math.load()
    assert len(gsm_probs) == 200 and gsm_probs[0].answer == "72" and gsm_probs[0].id == "gsm8k-00000"
    assert len(math_probs) == 100 and all(p.difficulty in (1, 2, 3, 4, 5) for p in math_probs)
    assert (package / "LICENSE-gsm8k.txt").is_file() and (package / "LICENSE-math500.txt").is_file()
    shipped = sorted(f.name for f in package.iterdir() if f.is_file() and f.suffix != ".py")
    assert sum((package / f).stat().st_size for f in shipped) < 300_000  # small: a sample, not the sets
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["ditto.data"]
    assert all(any(fnmatch(f, pat) for pat in patterns) for f in shipped), (shipped, patterns)  # installed too


def test_data_errors_name_the_file_line_and_field(tmp_path):
    from ditto.eval.tasks.base import read_jsonl

    f = tmp_path / "README.md"
    f.write_text("# title\n")
    with pytest.raises(ValueError, match=r"README.md line 1: not JSON .*one JSON object per line"):
        read_jsonl(f, ("question",), "GSM8K")
    f.write_text('{"question": "q"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 3: expected a JSON object, got list"):
        read_jsonl(f)
    f.write_text('{"question": "q"}\n{"q": 1}\n')
    with pytest.raises(ValueError, match="line 2: no 'question' field"):
        read_jsonl(f, ("question",), "GSM8K")
    f.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        read_jsonl(f)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        find_data_file(["gsm8k.jsonl"], tmp_path / "typo.jsonl")  # never silently the bundled sample
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        find_data_file(["gsm8k.jsonl"], tmp_path)  # a folder without the file


def test_prompt_formats():
    p = make_problem(0, 1, 1, 0)
    few = PromptTemplate(format="fewshot", shots=2).render(p, "arith", None)
    assert few.count("Question:") == 3 and few.endswith(f"Question: {p.question}\nAnswer:")
    assert PromptTemplate(format="fewshot").stop()
    r1, r2 = PromptTemplate().record("gsm8k"), PromptTemplate(thousands=True).record("gsm8k")
    assert r1["sha256"] != r2["sha256"]
    with pytest.raises(ValueError):
        PromptTemplate(format="nope")
