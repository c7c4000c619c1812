"""`ditto eval --strategy`: strategy runs on the tiny random Llama through ditto's own backend.

Covers: records (answer, grading, Cost, call log, trace), cost == the token counts the backend returned,
the budget cap, resumption, refusal to mix configs, a two-model strategy with --second-model, and
`ditto eval compare` over several strategy runs (compare.md / compare.json / compare.png).
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ditto.cli import main  # noqa: E402
from ditto.eval.report_compare import _run_label, _variants  # noqa: E402
from ditto.eval.runner import load_results  # noqa: E402
from ditto.eval.strategy_runner import StrategySpec, build_strategy, parse_strategy_args  # noqa: E402


def _eval(model, out, *extra: str) -> int:
    argv = ["eval", "--model", str(model), "--threads", "1", "--task", "arith-easy", "--max-tokens", "16"]
    argv += ["--grader-workers", "1", "--no-progress", "--out", str(out), *extra]
    return main(argv)


def _check_costs(records: list[dict], budget: int) -> None:
    for r in records:
        cost, calls, sample = r["cost"], r["calls"], r["samples"][0]
        generated = sum(sum(c["tokens"]) for c in calls if c["op"] == "generate")
        scored = sum(sum(c["tokens"]) for c in calls if c["op"] == "score")
        assert cost["generated_tokens"] == generated == sample["n_tokens"]
        assert cost["scored_tokens"] == scored
        assert cost["model_calls"] == len(calls)
        assert 0 < cost["generated_tokens"] <= budget
        assert isinstance(sample["correct"], bool) and sample["status"] in ("ok", "no_answer")
        assert r["n_correct"] == int(sample["correct"])
        assert r["trace"]["strategy"] == r["strategy"]


def test_strategy_args_and_build():
    assert parse_strategy_args(["n=8", "temperature=0.7", "mode=cgs", "prune=false"]) == {
        "n": 8,
        "temperature": 0.7,
        "mode": "cgs",
        "prune": False,
    }
    with pytest.raises(ValueError):
        parse_strategy_args(["n"])
    s = build_strategy(StrategySpec("self_consistency", budget=512, args={"n": "auto"}), max_tokens=128, seed=7)
    assert (s.n, s.seed) == (4, 7)
    s = build_strategy(StrategySpec("self_consistency", budget=512, args={"seed": 3}), max_tokens=128, seed=7)
    assert s.seed == 3  # an explicit seed wins over the per-problem one
    with pytest.raises(ValueError, match="no argument beam_width"):
        build_strategy(StrategySpec("best_of_n", args={"beam_width": 2}), max_tokens=16)
    assert build_strategy(StrategySpec("best_of_n", args={"n": 3}), max_tokens=16).n == 3  # via **kw
    with pytest.raises(ValueError, match="second-model"):
        build_strategy(StrategySpec("chunk_guided", budget=64), max_tokens=16)
    with pytest.raises(ValueError, match="second-model"):
        build_strategy(StrategySpec("best_of_n", budget=64, args={"scorer": "second"}), max_tokens=16)
    s = build_strategy(StrategySpec("greedy", args={"instruction": "eval"}), max_tokens=16)
    assert "The answer is N." in s.instruction and "{problem}" in s.instruction


def test_strategy_runs_resume_and_compare(tiny_llama, tmp_path):
    greedy, sc = tmp_path / "greedy", tmp_path / "sc"
    assert _eval(tiny_llama, greedy, "--limit", "3", "--strategy", "greedy", "--budget", "64") == 0
    # self-consistency: two problems first, then resume to three (the first two are not redone)
    sc_args = ["--strategy", "self_consistency", "--budget", "64", "--strategy-arg", "n=4"]
    assert _eval(tiny_llama, sc, "--limit", "2", *sc_args) == 0
    first = load_results(sc / "results.jsonl")
    assert len(first) == 2
    assert _eval(tiny_llama, sc, "--limit", "3", *sc_args) == 0
    recs = load_results(sc / "results.jsonl")
    assert [r["id"] for r in recs[:2]] == [r["id"] for r in first]
    assert recs[:2] == first and len(recs) == 3
    assert len((sc / "results.jsonl").read_text().splitlines()) == 3
    manifest = json.loads((sc / "manifest.json").read_text())
    assert [s["resumed_with"] for s in manifest["sessions"]] == [0, 2]
    assert all(s["seconds"] > 0 for s in manifest["sessions"])
    # what the numbers were computed under: the engine's counters, per session (a fresh engine each time)
    for s in manifest["sessions"]:
        stats = s["engine_stats"]["policy"]
        assert stats["steps"] > 0 and stats["decode_tokens"] > 0 and stats["scoring_preemptions"] == 0
        assert "second" not in s["engine_stats"]
    assert manifest["strategy"]["name"] == "self_consistency"
    assert manifest["strategy"]["config"]["n"] == 4
    assert manifest["strategy"]["budget"]["max_generated_tokens"] == 64
    # a different budget into the same folder is refused
    assert _eval(tiny_llama, sc, "--limit", "3", "--strategy", "self_consistency", "--budget", "32") == 2

    _check_costs(recs, 64)
    for r in recs:  # four samples of at most 64 // 4 tokens, drawn in one call
        assert len(r["calls"]) == 1 and len(r["calls"][0]["tokens"]) == 4
        assert max(r["calls"][0]["tokens"]) <= 16
        assert len(r["trace"]["answers"]) == 4
    g = load_results(greedy / "results.jsonl")
    _check_costs(g, 64)
    assert all(len(r["calls"]) == 1 and len(r["calls"][0]["tokens"]) == 1 for r in g)
    summary = json.loads((sc / "summary.json").read_text())
    assert summary["wall_seconds"] == pytest.approx(sum(s["seconds"] for s in manifest["sessions"]))
    assert summary["cost"]["mean"]["generated_tokens"] == pytest.approx(
        sum(r["cost"]["generated_tokens"] for r in recs) / 3
    )
    report = (sc / "report.md").read_text()
    assert "## Strategy: self_consistency" in report and "generated tokens" in report

    cmp_dir = tmp_path / "cmp"
    assert main(["eval", "compare", str(greedy), str(sc), "--out", str(cmp_dir)]) == 0
    md = (cmp_dir / "compare.md").read_text()
    assert "greedy@64" in md and "self_consistency@64" in md and "(baseline)" in md
    numbers = json.loads((cmp_dir / "compare.json").read_text())
    assert numbers["problems"] == 3
    rows = {r["label"]: r for r in numbers["runs"]}
    assert rows["greedy@64"]["baseline"] == "self_consistency@64"  # the default baseline
    assert "mcnemar_p" in rows["greedy@64"]
    unbudgeted = {"strategy": {"name": "greedy", "budget": {"max_generated_tokens": None}}}
    assert _run_label(unbudgeted, greedy) == ("greedy", "greedy", None)  # no "greedy@None"
    tokens = sum(r["cost"]["generated_tokens"] for r in recs)
    assert rows["self_consistency@64"]["total_cost"]["generated_tokens"] == tokens
    assert (cmp_dir / "compare.png").stat().st_size > 1000

    # one sample of 16 tokens: with --pair-by tokens each run pairs with the voting run nearest in what it spent
    sc1 = tmp_path / "sc1"
    assert _eval(tiny_llama, sc1, "--limit", "3", "--strategy", "self_consistency", "--budget", "16") == 0
    tok_dir = tmp_path / "cmp-tok"
    argv = ["eval", "compare", str(greedy), str(sc), str(sc1), "--pair-by", "tokens", "--out", str(tok_dir)]
    assert main(argv) == 0
    rows = {r["label"]: r for r in json.loads((tok_dir / "compare.json").read_text())["runs"]}
    spent = {
        label: rows[label]["mean_cost"]["generated_tokens"] for label in ("self_consistency@64", "self_consistency@16")
    }
    g = rows["greedy@64"]["mean_cost"]["generated_tokens"]
    nearest = min(spent, key=lambda label: abs(math.log(spent[label] / g)))
    assert rows["greedy@64"]["baseline"] == nearest
    assert {rows[label]["variant"] for label in spent} == {"self_consistency"}  # one curve in the plot
    assert "closest in mean generated tokens" in (tok_dir / "compare.md").read_text()
    with pytest.raises(SystemExit):  # argparse refuses an unknown pairing
        main(["eval", "compare", str(greedy), str(sc), "--pair-by", "cost"])


def test_variants_name_the_knobs_that_differ():
    def run(name, budget, **args):
        return {"strategy": name, "budget": budget, "manifest": {"strategy": {"name": name, "args": args}}}

    xs = [
        run("best_of_n", 384, scorer="self", temperature=0.7),
        run("best_of_n", 384, scorer="second", temperature=0.7),
        run("self_consistency", 384, n=4),
        run("self_consistency", 768, n=8),
        run("greedy", None),
    ]
    _variants(xs)
    assert [x["label"] for x in xs] == [
        "best_of_n[scorer=self]@384",
        "best_of_n[scorer=second]@384",
        "self_consistency@384",
        "self_consistency@768",
        "greedy",
    ]


def test_two_model_strategy_with_second_model(tiny_llama, tmp_path):
    out = tmp_path / "cgs"
    args = ["--limit", "2", "--strategy", "chunk_guided", "--budget", "48", "--second-model", str(tiny_llama)]
    args += ["--strategy-arg", "k=2", "--strategy-arg", "chunk_tokens=4", "--strategy-arg", "max_chunks=3"]
    assert _eval(tiny_llama, out, *args) == 0
    recs = load_results(out / "results.jsonl")
    _check_costs(recs, 48)
    for r in recs:
        models = {(c["model"], c["op"]) for c in r["calls"]}
        assert ("policy", "generate") in models and ("second", "score") in models
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"]["second_backend"]["model_digest"] == manifest["backend"]["model_digest"]
    # without the second model the run is refused up front
    assert _eval(tiny_llama, tmp_path / "x", "--limit", "1", "--strategy", "chunk_guided", "--budget", "48") == 2


def test_glimp_router_threshold_calibrated_on_held_out_problems(tiny_llama, tmp_path):
    """threshold=calibrate: computed once from problems the run does not evaluate, recorded in the
    manifest, used by every problem, and reused (not recomputed) when the run resumes."""
    out = tmp_path / "glimp"
    args = ["--strategy", "glimp_router", "--budget", "48", "--second-model", str(tiny_llama)]
    args += ["--strategy-arg", "threshold=calibrate", "--strategy-arg", "calibration_problems=3"]
    args += ["--strategy-arg", "step_tokens=6", "--strategy-arg", "max_steps=3"]
    assert _eval(tiny_llama, out, "--limit", "2", *args) == 0
    cal = json.loads((out / "manifest.json").read_text())["strategy"]["calibration"]
    recs = load_results(out / "results.jsonl")
    assert len(cal["problems"]) == 3 and not set(cal["problems"]) & {r["id"] for r in recs}
    assert isinstance(cal["threshold"], float) and cal["large_fraction"] == 0.25
    assert all(r["trace"]["threshold"] == pytest.approx(cal["threshold"], abs=1e-6) for r in recs)
    _check_costs(recs, 48)
    assert _eval(tiny_llama, out, "--limit", "3", *args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"]["calibration"] == cal and len(manifest["sessions"]) == 2
    assert all(
        r["trace"]["threshold"] == pytest.approx(cal["threshold"], abs=1e-6)
        for r in load_results(out / "results.jsonl")
    )
    # calibration is glimp_router's knob only
    bad = ["--limit", "1", "--strategy", "greedy", "--budget", "16", "--strategy-arg", "threshold=calibrate"]
    assert _eval(tiny_llama, tmp_path / "bad", *bad) == 2


def test_program_answer_reads_prose_output():
    from ditto.strategies.tools import program_answer

    assert program_answer("The final answer is: 12 stamps\n") == "12"
    assert program_answer("step 1\n42\n") == "42"
    assert program_answer("x = 5") == "x = 5"
    assert program_answer("sqrt(2)") == "sqrt(2)"
    assert program_answer("") is None


def test_problems_in_flight_share_one_batch_and_match_one_at_a_time(tiny_llama, tmp_path):
    """--batch-problems 4 runs 4 problems at once on worker threads (their calls join one batch); in
    batch_invariant mode every record equals the one-at-a-time run's: answer, text, cost, call log."""
    args = ["--limit", "6", "--strategy", "beam_search", "--budget", "96", "--determinism", "batch_invariant"]
    args += ["--strategy-arg", "beam_width=2", "--strategy-arg", "expand=2", "--strategy-arg", "step_rule=8"]
    assert _eval(tiny_llama, tmp_path / "one", *args, "--batch-problems", "1") == 0
    assert _eval(tiny_llama, tmp_path / "four", *args, "--batch-problems", "4") == 0
    one = {r["id"]: r for r in load_results(tmp_path / "one" / "results.jsonl")}
    four = {r["id"]: r for r in load_results(tmp_path / "four" / "results.jsonl")}
    assert one.keys() == four.keys() and len(one) == 6
    for pid, r in one.items():
        a, b = r["samples"][0], four[pid]["samples"][0]
        assert (a["text"], a["answer"], a["correct"]) == (b["text"], b["answer"], b["correct"])
        assert r["calls"] == four[pid]["calls"]
        assert {k: v for k, v in r["cost"].items() if k != "wall_time_s"} == {
            k: v for k, v in four[pid]["cost"].items() if k != "wall_time_s"
        }
    _check_costs(list(four.values()), 96)
    manifest = json.loads((tmp_path / "four" / "manifest.json").read_text())
    assert manifest["batch_limits"]["problems_in_flight"] == 4


def test_task_prompt_renders_the_eval_template_into_strategies(tiny_llama, tmp_path):
    """prompt=task: the policy sees the eval's chat-fewshot prompt (exemplars as earlier turns); the
    manifest records that template; tool strategies keep their own protocol; a plain format is refused."""
    from ditto.eval.prompts import EXEMPLARS
    from ditto.eval.runner import EvalConfig
    from ditto.eval.strategy_runner import task_renderer
    from ditto.strategies.base import format_prompt

    template, render = task_renderer(EvalConfig(task="arith-easy", prompt="chat-fewshot"), "arith-easy")
    s = build_strategy(StrategySpec("self_consistency", args={"prompt": "task", "n": 2}), 16, renderer=render)

    class Chat:  # the tiny models' chat template, as text
        def chat_prompt(self, messages, add_generation_prompt=True):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    text = s.prompt(Chat(), "What is 2 + 3?")
    assert text.count("<user>") == len(EXEMPLARS["default"]) + 1 and text.endswith("What is 2 + 3?<assistant>")
    tir = build_strategy(StrategySpec("tool_integrated", args={"prompt": "task"}), 16, renderer=render)
    assert tir.prompt(Chat(), "q") == format_prompt(Chat(), "q", tir.instruction)
    with pytest.raises(ValueError, match="chat-fewshot"):
        task_renderer(EvalConfig(task="arith-easy", prompt="fewshot"), "arith-easy")

    out = tmp_path / "sc"
    args = [
        "--limit",
        "2",
        "--prompt",
        "chat-fewshot",
        "--shots",
        "1",
        "--strategy",
        "self_consistency",
        "--budget",
        "32",
    ]
    assert _eval(tiny_llama, out, *args, "--strategy-arg", "n=2", "--strategy-arg", "prompt=task") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt_template"]["format"] == "chat-fewshot"
    assert manifest["prompt_template"]["shots"] == 1 and len(manifest["prompt_template"]["exemplars"]) == 1
    _check_costs(load_results(out / "results.jsonl"), 32)
