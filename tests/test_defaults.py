"""One set of sampling defaults: SamplingParams, the CLI flags and the server's request fields agree."""

from __future__ import annotations

import argparse

import pytest

from ditto.sampling import DEFAULTS, SamplingParams


def test_the_chosen_defaults():
    d = SamplingParams()
    assert (d.temperature, d.max_tokens, d.seed, d.n) == (0.0, 512, None, 1)
    assert (d.top_k, d.top_p, d.min_p, d.repetition_penalty) == (0, 1.0, 0.0, 1.0)
    assert d.greedy and d == DEFAULTS


class Parsed(Exception):
    pass


_PARSE_ARGS = argparse.ArgumentParser.parse_args


def _parsed(monkeypatch, argv: list[str]) -> dict:
    """The namespace `ditto argv` parses to (the command itself is not run)."""
    from ditto.cli import main

    seen = {}

    def capture(self, args=None, namespace=None):
        seen.update(vars(_PARSE_ARGS(self, args, namespace)))
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed):
        main(argv)
    return seen


def test_cli_flags_read_their_defaults_from_sampling_params(monkeypatch):
    gen = _parsed(monkeypatch, ["generate", "x"])
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_tokens"):
        assert gen[name] == getattr(DEFAULTS, name), name
    for command in ("eval", "repro"):
        args = _parsed(monkeypatch, [command])
        assert (args["temperature"], args["max_tokens"]) == (DEFAULTS.temperature, DEFAULTS.max_tokens), command
    assert _parsed(monkeypatch, ["bench"])["temperature"] == DEFAULTS.temperature


def test_server_request_defaults_are_the_same():
    from ditto.server.protocol import ChatCompletionRequest, CompletionRequest, sampling_params

    for req in (
        CompletionRequest(model="m", prompt="hi"),
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]),
    ):
        assert req.temperature == DEFAULTS.temperature and req.max_tokens is None  # None: the default, capped
        assert req.seed is None and req.top_p == DEFAULTS.top_p and req.top_k == DEFAULTS.top_k
        params = sampling_params(req, DEFAULTS.max_tokens, None)
        assert params.replace(seed=None) == DEFAULTS  # a fresh seed is drawn (and returned), nothing else differs
        assert params.seed is not None


def test_server_default_max_tokens_is_capped_at_the_room_left(tiny_llama):
    """A request that names no max_tokens gets ditto's default, or what the context leaves when that is less;
    one that names too many is refused."""
    from fastapi.testclient import TestClient

    from ditto import LLM
    from ditto.server.app import create_app

    llm = LLM(str(tiny_llama), determinism="batch_invariant", progress=False)
    room = llm.config.max_model_len or 512
    with TestClient(create_app(llm, served_name="tiny")) as client:
        body = {"model": "tiny", "prompt": [5] * (room - 20), "ignore_eos": True}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 20 and r.json()["choices"][0]["finish_reason"] == "length"
        r = client.post("/v1/completions", json={**body, "max_tokens": 21})
        assert r.status_code == 400 and "max_tokens=21 does not fit" in r.json()["error"]["message"]
        short = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6], "ignore_eos": True})
        assert short.json()["usage"]["completion_tokens"] == min(DEFAULTS.max_tokens, room - 2)


def test_auto_determinism_is_settled_by_the_device():
    """'auto' (the default everywhere) names a level per device: batch_invariant on CPU, where the
    fixed-order kernels make it free; fast on CUDA; exact for numerics integer. Nothing records 'auto'."""
    from ditto.config import EngineConfig, auto_determinism, check_numerics

    assert EngineConfig().determinism == "auto"
    assert auto_determinism("fp32", "cpu") == auto_determinism("bf16", "cpu") == "batch_invariant"
    assert auto_determinism("fp32", "cuda") == "fast"
    assert auto_determinism("integer", "cpu") == auto_determinism("integer", "cuda") == "exact"
    assert auto_determinism("int8", "cpu") == "fast"  # LLM.int8 picks outliers from the batch: never invariant
    check_numerics("integer", "auto")  # auto suits every numerics mode; an explicit level still must match
    with pytest.raises(ValueError, match="go together"):
        check_numerics("integer", "fast")
    with pytest.raises(ValueError, match="unknown determinism"):
        EngineConfig(determinism="sometimes")


def test_cli_determinism_defaults_to_auto(monkeypatch):
    for command in (["generate", "x"], ["eval"], ["bench"], ["serve"]):
        assert _parsed(monkeypatch, command)["determinism"] == "auto", command


def test_default_llm_runs_batch_invariant_on_cpu(tiny_llama):
    """A default LLM is the batch_invariant engine: same config, same bits as asking for it by name,
    and a receipt of it names the level it ran (a verifier must know the promise, not 'auto')."""
    import torch

    from ditto import LLM, SamplingParams

    default = LLM(str(tiny_llama), progress=False)
    named = LLM(str(tiny_llama), determinism="batch_invariant", progress=False)
    integer = LLM(str(tiny_llama), numerics="integer", progress=False)
    assert default.config == named.config and default.config.determinism == "batch_invariant"
    assert integer.config.determinism == "exact" and default.info()["determinism"] == "batch_invariant"
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=12)
    a = default.generate([[1, 5, 9, 2]], params)[0]
    b = named.generate([[1, 5, 9, 2]], params)[0]
    assert a.token_ids == b.token_ids and a.metrics["determinism"] == "batch_invariant"
    assert torch.equal(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs))


def test_default_llm_int8_runs_fast(tiny_llama):
    """LLM.int8 cannot be batch invariant, so its default is 'fast' rather than a refusal; asking for
    batch_invariant by name still gets the clear error."""
    from ditto import LLM, SamplingParams

    llm = LLM(str(tiny_llama), numerics="int8", progress=False)
    assert llm.config.determinism == "fast"
    assert len(llm.generate([[1, 5, 9, 2]], SamplingParams(temperature=0, max_tokens=4))[0].token_ids) == 4
    with pytest.raises(ValueError, match="cannot be batch-invariant"):
        LLM(str(tiny_llama), numerics="int8", determinism="batch_invariant", progress=False)
