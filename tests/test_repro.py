"""`ditto repro`: study metrics on hand cases, a small matrix run on a tiny model, the llama.cpp backend."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from ditto.repro.metrics import agreement, common_ids, distinct_count, divergence_index, std, study_metrics
from ditto.repro.runner import RunConfig, Workload, WorkloadMismatch, expand_matrix, run_study

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def groups_agree(results: dict[str, dict[str, dict]], names: list[str]) -> bool:
    """True when every config in `names` produced identical token ids on every common prompt."""
    sub = {n: results[n] for n in names}
    return all(distinct_count([sub[n][p]["token_ids"] for n in names]) == 1 for p in common_ids(sub))


# ---------------------------------------------------------------------------------------------- metrics


def test_divergence_index_hand_cases():
    assert divergence_index([1, 2, 3], [1, 2, 3]) is None
    assert divergence_index([1, 2, 3], [1, 5, 3]) == 1
    assert divergence_index([7], [8]) == 0
    assert divergence_index([1, 2], [1, 2, 3]) == 2  # one stopped, the other went on
    assert divergence_index([], []) is None
    assert divergence_index([], [4]) == 0


def test_distinct_agreement_std():
    assert distinct_count([[1, 2], [1, 2], [1, 3], []]) == 3
    assert distinct_count([[1], [1]]) == 1
    assert agreement([[1], [2], "a", None], [[1], [3], "a", None]) == 0.75
    assert math.isnan(agreement([], []))
    with pytest.raises(ValueError):
        agreement([1], [1, 2])
    assert std([1.0, 1.0, 1.0]) == 0.0
    assert std([0.0, 1.0]) == pytest.approx(math.sqrt(0.5))  # sample std (ddof=1)
    assert std([0.0, 1.0], ddof=0) == pytest.approx(0.5)
    assert std([3.0]) == 0.0


def _rec(toks, answer, correct):
    return {"token_ids": toks, "answer": answer, "correct": correct}


def test_study_metrics_hand_case():
    results = {
        "a": {"p1": _rec([1, 2, 3], "6", True), "p2": _rec([4, 5], "9", False)},
        "b": {"p1": _rec([1, 2, 3], "6", True), "p2": _rec([4, 6], "9", False)},
        "c": {"p1": _rec([1, 9], "7", False), "p2": _rec([4, 5], "9", False)},
    }
    m = study_metrics(results, reference="a")
    assert m["prompts"] == 2
    assert m["distinct_outputs"] == [2, 2]
    assert m["prompts_all_identical"] == 0
    assert m["divergence_vs_ref"] == [1, 1]  # b on p2 at 1, c on p1 at 1
    assert sorted(m["divergence_pairwise"]) == [1, 1, 1, 1]
    assert m["pairwise_exact"][0][1] == 0.5 and m["pairwise_exact"][0][2] == 0.5 and m["pairwise_exact"][1][2] == 0.0
    assert m["pairwise_answer"][0][1] == 1.0 and m["pairwise_answer"][0][2] == 0.5
    assert m["per_config"]["a"]["accuracy"] == 0.5 and m["per_config"]["c"]["accuracy"] == 0.0
    assert m["accuracy_std"] == pytest.approx(std([0.5, 0.5, 0.0]))
    assert m["response_length_std_mean"] == pytest.approx(std([3, 3, 2]) / 2)
    assert groups_agree(results, ["a", "b"]) is False
    assert groups_agree({"a": results["a"], "a2": dict(results["a"])}, ["a", "a2"]) is True


def test_matrix_skips_invalid_combinations():
    configs, skipped = expand_matrix(
        ["ditto", "transformers", "llama_cpp"], ["fp32", "integer"], ["fast", "exact"], [1, 8], [2]
    )
    names = {c.name for c in configs}
    assert "ditto-fp32-fast-b8-t2" in names and "ditto-integer-exact-b1-t2" in names
    assert "ditto-integer-fast-b1-t2" not in names and "ditto-fp32-exact-b1-t2" not in names
    assert "transformers-fp32-none-b8-t2" in names and "transformers-integer-none-b1-t2" not in names
    assert "llama_cpp-gguf-none-b1-t2" in names and "llama_cpp-gguf-none-b8-t2" not in names
    reasons = " ".join(s.reason for s in skipped)
    assert "exact" in reasons and "batch 1 only" in reasons and "transformers runs" in reasons
    assert RunConfig.parse("transformers:bf16:-:4", 1).name == "transformers-bf16-none-b4-t1"
    assert RunConfig.parse("llama_cpp", 3).name == "llama_cpp-gguf-none-b1-t3"
    with pytest.raises(ValueError):
        RunConfig.parse("vllm:fp32", 1)


# ---------------------------------------------------------------------------------------------- a small study


@pytest.fixture(scope="module")
def study(tiny_dirs, tmp_path_factory):
    model = str(tiny_dirs["llama"])
    out = tmp_path_factory.mktemp("repro")
    configs, skipped = expand_matrix(["ditto"], ["fp32"], ["fast", "batch_invariant"], [1, 4], [1])
    configs.append(RunConfig("ditto", "fp32", "batch_invariant", 4, 2))
    configs.append(RunConfig("transformers", "fp32", "none", 2, 1))
    workload = Workload(model=model, task="arith-easy", limit=4, max_tokens=8, prompt="chat")
    res = run_study(workload, configs, out, skipped=skipped, reference="ditto-fp32-batch_invariant-b1-t1")
    return out, res, workload, configs


def test_study_writes_results_manifests_and_report(study):
    out, res, workload, configs = study
    assert res["ran"] == [c.name for c in configs] and not res["skipped"]
    for c in configs:
        d = out / "configs" / c.name
        lines = (d / "results.jsonl").read_text().splitlines()
        assert len(lines) == 4
        rec = json.loads(lines[0])
        assert {"id", "token_ids", "text", "answer", "correct", "gold"} <= set(rec)
        man = json.loads((d / "manifest.json").read_text())
        assert man["complete"] and man["backend_info"]["backend"] == c.backend
    assert man["backend_info"]["backend"] == "transformers"
    md = (out / "report.md").read_text()
    for needle in ("distinct outputs per prompt", "pairwise exact-match agreement", "Per config", "accuracy mean"):
        assert needle in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 3
    assert (out / "plots" / "pairwise_exact.png").stat().st_size > 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["prompts"] == 4 and m["reference"] == "ditto-fp32-batch_invariant-b1-t1"


def test_batch_invariant_configs_agree_across_batch_sizes(study):
    out, _, _, _ = study
    from ditto.repro.runner import load_study

    _, results, _ = load_study(out)
    names = ["ditto-fp32-batch_invariant-b1-t1", "ditto-fp32-batch_invariant-b4-t1"]
    assert groups_agree(results, names), "ditto's batch_invariant promise broken across batch sizes"
    m = json.loads((out / "metrics.json").read_text())
    inv = {g["group"]: g["identical"] for g in m["batch_invariance"]}
    assert inv["ditto-fp32-batch_invariant-t1"] is True
    by_threads = {g["group"]: (g["threads"], g["identical"]) for g in m["threads_invariance"]}
    assert by_threads["ditto-fp32-batch_invariant-b4"] == ("1,2", True)
    both = {g["group"]: (g["variants"], g["identical"]) for g in m["both_invariance"]}
    assert both["ditto-fp32-batch_invariant"] == ("b1-t1,b4-t1,b4-t2", True)
    assert "## Thread-count invariance" in (out / "report.md").read_text()


def test_study_resumes_and_refuses_other_workload(study, capsys):
    out, _, workload, configs = study
    again = run_study(workload, configs, out, report=False)
    assert again["ran"] == [] and again["reused"] == [c.name for c in configs]
    other = Workload(model=workload.model, task="arith-easy", limit=3, max_tokens=8)
    with pytest.raises(WorkloadMismatch):
        run_study(other, configs, out)
    from ditto.cli import main

    assert main(["repro", "--report-only", "--out", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- llama.cpp


def test_llama_cpp_missing_gives_a_clear_error(monkeypatch, tmp_path):
    from ditto.backends import llama_cpp as lc

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert lc.available() is False
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        lc.LlamaCppBackend(tmp_path / "m.gguf")


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (optional extra)")
def test_llama_cpp_backend_on_bundled_smollm2():
    from ditto.backends.base import Backend
    from ditto.backends.llama_cpp import LlamaCppBackend
    from ditto.loader.registry import resolve_model
    from ditto.loader.tokenizer import Tokenizer
    from ditto.sampling import SamplingParams

    path = resolve_model("smollm2-135m-instruct")
    be = LlamaCppBackend(path, threads=1, n_ctx=512)
    assert isinstance(be, Backend)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    assert be.chat_prompt(msgs) == Tokenizer.from_gguf(path).apply_chat_template(msgs, add_generation_prompt=True)
    ids = be.encode(be.chat_prompt(msgs), add_special_tokens=False)
    out = be.generate([ids, ids], SamplingParams(max_tokens=8, temperature=0))
    a, b = out[0].outputs[0], out[1].outputs[0]
    assert a.token_ids == b.token_ids and 0 < len(a.token_ids) <= 8 and a.text
    assert be.decode(a.token_ids) == a.text
    sc = be.score(ids, a.token_ids[:4])
    assert sc.top_ids == a.token_ids[:4]  # greedy tokens are the argmax under teacher forcing
    assert all(lp <= 0 for lp in sc.logprobs)
    s1 = be.generate([ids], SamplingParams(max_tokens=6, temperature=0.9, seed=5))[0].outputs[0].token_ids
    s2 = be.generate([ids], SamplingParams(max_tokens=6, temperature=0.9, seed=5))[0].outputs[0].token_ids
    assert s1 == s2  # llama.cpp's own seeded sampler is repeatable
    info = be.info()
    assert info["backend"] == "llama_cpp" and info["threads"] == 1 and info["versions"]["llama_cpp_python"]
    assert "NOT ditto" in info["sampler"]


def test_cli_takes_comma_lists_without_touching_other_commands():
    import argparse

    from ditto.cli import engine_parent
    from ditto.repro.cli import _configs, add_parser

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    eng = engine_parent()
    add_parser(sub, parents=[eng])
    sub.add_parser("generate", parents=[eng])
    args = parser.parse_args(
        ["repro", "--numerics", "fp32,integer", "--determinism", "fast,exact", "--threads", "1,2", "--batch-sizes", "1"]
    )
    configs, skipped = _configs(args)
    assert {c.name for c in configs} == {
        "ditto-fp32-fast-b1-t1",
        "ditto-fp32-fast-b1-t2",
        "ditto-integer-exact-b1-t1",
        "ditto-integer-exact-b1-t2",
    }
    assert len(skipped) == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--determinism", "fast,exact"])  # still a single choice there
