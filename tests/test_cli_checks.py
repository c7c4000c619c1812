"""Every command checks its arguments and input files before a model loads.

The loader is replaced by one that fails the test: a bad argument must be refused (exit status 2,
a message naming the flag, or the file and line) without reaching it. A control case shows that
good arguments do reach it, so the refusals are the checks' doing.
"""

from __future__ import annotations

import json

import pytest
import torch

from ditto.cli import main


class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_load(monkeypatch):
    """LLM(...) raises ModelLoaded: reaching it means the checks let the command through."""

    def refuse(self, *a, **k):
        raise ModelLoaded

    monkeypatch.setattr("ditto.llm.LLM.__init__", refuse)


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run `ditto argv`; assert exit status 2 and every needle in stderr (which names the command)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"ditto {argv[0]}: error:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_good_arguments_reach_the_loader(no_load, capsys):
    with pytest.raises(ModelLoaded):
        main(["generate", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "hi"])


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--temperature", "-1"], "argument --temperature: must be in [0, 100]"),
        (["--top-p", "0"], "argument --top-p: must be in (0, 1]"),
        (["--top-k", "-3"], "argument --top-k: must be >= 0"),
        (["--min-p", "1.5"], "argument --min-p: must be in [0, 1]"),
        (["--repetition-penalty", "0"], "argument --repetition-penalty: must be > 0"),
        (["--max-tokens", "0"], "argument --max-tokens: must be >= 1"),
        (["--seed", "-1"], "argument --seed: must be in [0, 2^63)"),
        (["--stop", ""], "argument --stop:"),
        (["--numerics", "fp64"], "argument --numerics: must be one of fp32, bf16"),
        (["--threads", "0"], "argument --threads: must be a positive integer"),
        (["--max-num-seqs", "0"], "argument --max-num-seqs"),
        (["--kv-cache-gb", "-1"], "argument --kv-cache-gb: must be a positive number"),
        (["--device", "tpu"], "argument --device:"),
        (["--model", "no/such/model.gguf"], "argument --model:"),
    ],
)
def test_generate_refuses_bad_flags_before_loading(no_load, capsys, flags, needle):
    refused(capsys, ["generate", *flags, "hi"], needle)


def test_generate_refuses_bad_files_and_prompt(no_load, capsys, tmp_path):
    refused(
        capsys, ["generate", "--receipt", str(tmp_path / "missing" / "r.json"), "hi"], "argument --receipt", "missing"
    )
    refused(capsys, ["generate", "--receipt", str(tmp_path), "hi"], "is a folder")
    refused(capsys, ["generate", "--receipt", "r.json", "--sign-key", str(tmp_path / "k.pem"), "hi"], "no such file")
    (tmp_path / "k.pem").write_text("not a key")
    refused(capsys, ["generate", "--receipt", "r.json", "--sign-key", str(tmp_path / "k.pem"), "hi"], "PEM")
    refused(capsys, ["generate", "   "], "the prompt is empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda is a valid device here")
def test_cuda_without_gpu_is_refused_before_loading(no_load, capsys):
    refused(capsys, ["generate", "--device", "cuda", "hi"], "argument --device", "no CUDA GPU")


def test_chat_refuses_bad_sampling(no_load, capsys):
    refused(capsys, ["chat", "--top-k", "-2"], "argument --top-k")


def test_bench_names_the_data_file_and_line(no_load, capsys, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# not JSON\n")
    refused(capsys, ["bench", "--data", str(readme)], str(readme), "line 1: not JSON", "one JSON object per line")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "a"}) + "\n\n" + json.dumps({"q": "b"}) + "\n")
    refused(capsys, ["bench", "--data", str(rows)], "line 3: no 'question' field")
    refused(capsys, ["bench", "--data", str(tmp_path / "nope.jsonl")], "argument --data", "no such file or folder")
    refused(capsys, ["bench", "--prompts", "0"], "argument --prompts")
    refused(capsys, ["bench", "--temperature", "-0.5"], "argument --temperature")
    refused(capsys, ["bench", "--json", str(tmp_path / "no" / "b.json")], "argument --json")


def test_quality_refuses_bad_modes_window_and_text(no_load, capsys, tmp_path):
    refused(capsys, ["quality", "--modes", "fp32,fp64"], "argument --modes", "fp64")
    refused(capsys, ["quality", "--window", "1"], "argument --window")
    refused(capsys, ["quality", "--text", str(tmp_path / "missing.txt")], "argument --text", "unknown text")
    bad = tmp_path / "math.jsonl"
    bad.write_text(json.dumps({"problem": "x"}) + "\n")
    refused(capsys, ["quality", "--data", str(bad)], "line 1: no 'solution' field")


def test_eval_checks_task_data_sampling_and_strategy(no_load, capsys, tmp_path):
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    out = str(tmp_path / "run")
    refused(capsys, ["eval", "--data", str(bad), "--out", out], str(bad), "without '####'")
    refused(capsys, ["eval", "--n", "0", "--out", out], "argument --n")
    refused(capsys, ["eval", "--temperature", "-1", "--out", out], "argument --temperature")
    refused(capsys, ["eval", "--task", "arith", "--arith-digits", "x", "--out", out], "argument --arith-digits")
    refused(capsys, ["eval", "--offset", "100000", "--out", out], "no problems left")
    refused(capsys, ["eval", "--strategy", "nope", "--out", out], "argument --strategy", "nope")
    refused(
        capsys,
        ["eval", "--strategy", "self_consistency", "--strategy-arg", "bogus=1", "--out", out],
        "argument --strategy-arg",
        "bogus",
    )
    (tmp_path / "afile").write_text("")
    refused(capsys, ["eval", "--out", str(tmp_path / "afile")], "argument --out")


def test_repro_checks_matrix_flags_and_data(no_load, capsys, tmp_path):
    out = str(tmp_path / "study")
    refused(capsys, ["repro", "--numerics", "fp32,fp64", "--out", out], "argument --numerics", "fp64")
    refused(capsys, ["repro", "--batch-sizes", "1,0", "--out", out], "argument --batch-sizes")
    refused(capsys, ["repro", "--backends", "vllm", "--out", out], "argument --backends")
    refused(capsys, ["repro", "--max-tokens", "0", "--out", out], "argument --max-tokens")
    refused(capsys, ["repro", "--data", str(tmp_path / "none"), "--out", out], "argument --data")
    refused(capsys, ["repro", "--report-only", "--out", out], "argument --out")


def test_serve_checks_its_flags(no_load, capsys, tmp_path):
    refused(capsys, ["serve", "--port", "70000"], "argument --port")
    refused(capsys, ["serve", "--max-queue", "0"], "argument --max-queue")
    refused(capsys, ["serve", "--sign-key", str(tmp_path / "k.pem")], "argument --sign-key")
    refused(capsys, ["serve", "--numerics", "fp64"], "argument --numerics")
