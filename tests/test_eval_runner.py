"""The eval runner end to end on a tiny random-weight HF Llama through TransformersBackend.

Covers: the Backend protocol on transformers, run folders (manifest, results, report), resumption
after SIGKILL (subprocess) with a torn last line, config-mismatch refusal, a grader that hangs
inside a run, `compare`, and the CLI's help text.
"""

from __future__ import annotations

import json
import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ditto.backends.base import Backend  # noqa: E402
from ditto.eval import cli  # noqa: E402
from ditto.eval.prompts import PromptTemplate  # noqa: E402
from ditto.eval.runner import EvalConfig, ResumeMismatch, load_results, run_eval  # noqa: E402
from ditto.eval.tasks.arith import make_problem  # noqa: E402
from ditto.sampling import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_tiny_hf_model(path: Path) -> Path:
    """A 2-layer random Llama with a character-level tokenizer and a chat template, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = list(dict.fromkeys(string.printable))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model is far faster on one thread (and CI machines are shared); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-hf-llama"))


@pytest.fixture(scope="module")
def backend(model_dir):
    from ditto.backends.transformers import TransformersBackend

    return TransformersBackend(model_dir, dtype="float32", batch_size=8)


def _cfg(**kw) -> EvalConfig:
    base = dict(
        task="arith-easy",
        limit=6,
        n=2,
        temperature=0.8,
        seed=3,
        max_tokens=8,
        prompt="chat",
        batch_problems=3,
        grader_timeout=20,
        grader_workers=1,
    )
    base.update(kw)
    return EvalConfig(**base)


# ----------------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------------


def test_transformers_backend_protocol(backend):
    assert isinstance(backend, Backend)
    prompts = ["What is 3 + 4?", "Tom has 2 apples."]
    outs = backend.generate(prompts, SamplingParams(n=3, temperature=0.9, seed=5, max_tokens=6))
    assert [len(o.outputs) for o in outs] == [3, 3]
    c = outs[0].outputs[1]
    assert c.index == 1 and len(c.token_ids) == len(c.logprobs) <= 6 and c.finish_reason in ("stop", "length")
    again = backend.generate(prompts, SamplingParams(n=3, temperature=0.9, seed=5, max_tokens=6))
    assert [[x.token_ids for x in o.outputs] for o in outs] == [[x.token_ids for x in o.outputs] for o in again]
    # greedy: batched (left padding) equals one at a time, and score() reproduces the logprobs
    g = SamplingParams(n=1, temperature=0.0, max_tokens=6)
    both = backend.generate(prompts, g)
    single = backend.generate([prompts[1]], g)
    assert both[1].outputs[0].token_ids == single[0].outputs[0].token_ids
    sc = backend.score(prompts[1], single[0].outputs[0].token_ids)
    assert sc.top_ids == single[0].outputs[0].token_ids
    assert sc.logprobs == pytest.approx(single[0].outputs[0].logprobs, abs=1e-4)
    # stop strings cut the text
    text = single[0].outputs[0].text
    if len(text) >= 3:
        cut = backend.generate([prompts[1]], g.replace(stop=(text[2:4],)))[0].outputs[0]
        assert cut.finish_reason == "stop" and cut.text == text[: text.index(text[2:4])]
    info = backend.info()
    assert info["backend"] == "transformers" and info["model_digest"].startswith("sha256:")
    assert "NOT ditto" in info["determinism"] and info["versions"]["transformers"] == transformers.__version__
    chat = PromptTemplate(format="chat").render(make_problem(0, 1, 1, 0), "gsm8k", backend)
    assert chat.startswith("user: Solve") and chat.endswith("assistant:")
    cf = PromptTemplate(format="chat-fewshot", shots=2).render(make_problem(0, 1, 1, 0), "math500", backend)
    assert cf.count("assistant: ") == 2 and "\\boxed" in cf


# ----------------------------------------------------------------------------------------------
# a run folder
# ----------------------------------------------------------------------------------------------


def test_run_writes_manifest_results_report(backend, tmp_path):
    out = tmp_path / "run"
    summary = run_eval(backend, _cfg(), out, progress=False)
    assert summary["problems"] == 6 and summary["samples_per_problem"] == 2
    man = json.loads((out / "manifest.json").read_text())
    assert summary["wall_seconds"] > 0
    assert summary["wall_seconds"] == pytest.approx(sum(s["seconds"] for s in man["sessions"]))
    assert man["sessions"][0]["engine_stats"] == {}  # HF transformers keeps no engine counters (ditto's LLM does)
    for key in (
        "backend",
        "sampling",
        "prompt_template",
        "grader",
        "versions",
        "hardware",
        "threads",
        "batch_limits",
        "seed_rule",
        "task",
        "resume_key",
    ):
        assert key in man, key
    assert man["backend"]["model_digest"] == backend.info()["model_digest"]
    assert man["sampling"]["n"] == 2 and man["sampling"]["noise"]
    assert man["grader"]["version"] and man["task"]["problems"] == 6
    recs = load_results(out / "results.jsonl")
    assert len(recs) == 6 and all(len(r["samples"]) == 2 for r in recs)
    s0 = recs[0]["samples"][0]
    assert {"text", "answer", "correct", "status", "n_tokens", "math_verify", "fallback"} <= set(s0)
    md = (out / "report.md").read_text()
    assert "pass@2" in md and "Wilson" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    for name in ("accuracy_vs_k", "length_hist", "by_difficulty", "solve_rates"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    # a finished run re-run is a no-op that keeps every record once
    run_eval(backend, _cfg(), out, progress=False, report=False)
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    # a different experiment into the same folder is refused
    with pytest.raises(ResumeMismatch, match="temperature"):
        run_eval(backend, _cfg(temperature=0.5), out, progress=False)
    # a larger --limit extends the run
    more = run_eval(backend, _cfg(limit=8), out, progress=False, report=False)
    assert more["problems"] == 8
    # compare: the run against itself -> no difference
    text, numbers = cli_compare(out, out)
    assert "no significant difference" in text and numbers["only_a"] == numbers["only_b"] == 0


def cli_compare(a, b):
    from ditto.eval.report import compare

    return compare(a, b)


def test_hanging_grader_inside_a_run(backend, tmp_path, monkeypatch):
    data = tmp_path / "gsm8k-test.jsonl"
    rows = [("What is 2 + 2?", "4"), ("Find the code.", "31337"), ("What is 3 + 3?", "6")]
    data.write_text("".join(json.dumps({"question": q, "answer": f"... \n#### {a}"}) + "\n" for q, a in rows))
    monkeypatch.setenv("DITTO_GRADER_TEST_HANG", "31337")  # test hook: grading this gold sleeps for ever
    summary = run_eval(
        backend,
        _cfg(task="gsm8k", data=str(data), limit=None, n=1, grader_timeout=1.5, grader_workers=2, prompt="fewshot"),
        tmp_path / "run",
        progress=False,
        report=False,
    )
    recs = {r["id"]: r for r in load_results(tmp_path / "run" / "results.jsonl")}
    assert summary["problems"] == 3
    assert recs["gsm8k-00001"]["samples"][0]["status"] == "timeout"
    assert recs["gsm8k-00001"]["samples"][0]["correct"] is False
    assert recs["gsm8k-00000"]["samples"][0]["status"] in ("ok", "no_answer")
    assert summary["grading_status"]["timeout"] == 1


# ----------------------------------------------------------------------------------------------
# resumption after SIGKILL
# ----------------------------------------------------------------------------------------------


def test_resume_after_kill(backend, model_dir, tmp_path):
    killed = tmp_path / "killed"
    args = [
        "--model",
        str(model_dir),
        "--task",
        "arith-easy",
        "--limit",
        "10",
        "--n",
        "2",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--max-tokens",
        "8",
        "--batch-problems",
        "1",
        "--grader-workers",
        "1",
        "--grader-timeout",
        "20",
        "--no-progress",
        "--out",
        str(killed),
    ]
    env = dict(os.environ, DITTO_EVAL_TEST_BATCH_DELAY="0.3", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditto.eval.cli", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    results = killed / "results.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if results.exists() and results.read_bytes().count(b"\n") >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("the eval subprocess wrote no results in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_before = len(load_results(results))
    assert 3 <= n_before < 10, "killed too late to test resumption"
    with open(results, "ab") as f:  # a torn line, as if the kill had hit a write
        f.write(b'{"id": "arith-d1-st1-3-00009", "samples": [{"te')

    cfg = _cfg(limit=10, batch_problems=4)  # the same experiment; batch size may differ on resume
    resumed = run_eval(backend, cfg, killed, progress=False, report=False)
    fresh = run_eval(backend, cfg, tmp_path / "fresh", progress=False, report=False)

    lines = results.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == 10 and len(set(ids)) == 10  # every problem exactly once, torn line gone
    a = {r["id"]: r for r in load_results(results)}
    b = {r["id"]: r for r in load_results(tmp_path / "fresh" / "results.jsonl")}
    assert set(a) == set(b)
    for pid in a:
        assert [s["text"] for s in a[pid]["samples"]] == [s["text"] for s in b[pid]["samples"]], pid
        assert a[pid]["n_correct"] == b[pid]["n_correct"]
    for key in ("problems", "samples", "accuracy", "pass_at_k", "maj_at_k", "mean_tokens_per_sample"):
        assert resumed[key] == fresh[key], key
    man = json.loads((killed / "manifest.json").read_text())
    assert len(man["sessions"]) == 2 and man["sessions"][1]["resumed_with"] == n_before


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_help_and_parse(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="ditto")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    cli.add_backend_args(common)
    cli.add_parser(sub, parents=[common])
    args = parser.parse_args(
        [
            "eval",
            "--task",
            "gsm8k",
            "--limit",
            "200",
            "--n",
            "8",
            "--temperature",
            "0.7",
            "--seed",
            "0",
            "--out",
            "runs/x",
            "--model",
            "m",
        ]
    )
    assert args.action == [] and args.n == 8 and args.out == "runs/x"
    cfg = EvalConfig.from_args(args)
    assert (cfg.task, cfg.limit, cfg.n, cfg.temperature) == ("gsm8k", 200, 8, 0.7)
    args = parser.parse_args(["eval", "compare", "runs/a", "runs/b"])
    assert args.action == ["compare", "runs/a", "runs/b"]
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "ditto eval compare" in help_text and "--thousands-sep" in help_text
