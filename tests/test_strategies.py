"""Strategies on a real (tiny, random-weight) HF Llama behind the Backend protocol.

Cost accounting is checked against a counting proxy that sits between the strategy and the backend
and counts, independently, what the backend returned.
"""

from __future__ import annotations

import math

import pytest
import torch

from ditto.outputs import CompletionOutput, RequestOutput, ScoreOutput
from ditto.sampling import SamplingParams, sample_row
from ditto.strategies import (
    Budget,
    ChunkGuided,
    Cost,
    GlimpRouter,
    LikelihoodScorer,
    PRMScorer,
    Result,
    SandboxLimits,
    ToolSession,
    available_strategies,
    calibrate_glimp_threshold,
    first_token_entropy,
    get_strategy,
    majority_vote,
    split_steps,
    tools,
)
from ditto.strategies.base import extract_answer, is_equivalent
from ditto.strategies.early_exit import probe_answer
from ditto.strategies.steps import Partial, best, extend, lengthen, solution, step_params
from ditto.strategies.tools import extract_code, parse_verdict

transformers = pytest.importorskip("transformers")

EOS = "<eos>"


def _build_model_dir(path, seed: int, hidden: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=vocab[EOS],
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper next-token distributions than the tiny init gives
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


class MiniHFBackend:
    """A minimal real Backend: HF model forward with a KV cache, ditto's own sampler, stop strings."""

    def __init__(self, path, name: str = "mini-hf"):
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

        self.name = name
        self.tok = PreTrainedTokenizerFast.from_pretrained(path)
        self.model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos = self.tok.eos_token_id

    def encode(self, text, add_special_tokens=True):
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages, add_generation_prompt=True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def info(self):
        return {"backend": self.name, "prefix_caching": False}

    @torch.no_grad()
    def _sample(self, prompt_ids, p: SamplingParams, index: int) -> CompletionOutput:
        out_ids, lps, tops = [], [], []
        past, inp = None, prompt_ids
        finish, stop_reason, text = "length", None, ""
        for t in range(p.max_tokens):
            o = self.model(input_ids=torch.tensor([inp]), past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = o.logits[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            tok = sample_row(logits, p, prompt_ids, out_ids, index, t)
            out_ids.append(tok)
            lps.append(float(logp[tok]))
            if p.logprobs:
                v, i = torch.topk(logp, p.logprobs)
                tops.append({int(a): float(b) for a, b in zip(i, v)})
            if tok == self.eos and not p.ignore_eos:
                finish, stop_reason = "stop", tok
                break
            text = self.decode(out_ids)
            hit = [(text.find(s), s) for s in p.stop if s in text]
            if hit:
                pos, s = min(hit)
                text, finish, stop_reason = text[:pos], "stop", s
                break
            inp = [tok]
        text = text if stop_reason is not None and isinstance(stop_reason, str) else self.decode(out_ids)
        return CompletionOutput(index, text, out_ids, lps, finish, tops if p.logprobs else None, None, stop_reason)

    def generate(self, prompts, params, *, progress=False):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results = []
        for k, (prompt, p) in enumerate(zip(prompts, plist)):
            p = p.with_seed()
            ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            outs = [self._sample(ids, p, i) for i in range(p.n)]
            results.append(RequestOutput(str(k), prompt if isinstance(prompt, str) else None, ids, outs, True))
        return results

    @torch.no_grad()
    def score(self, prompt, continuation):
        p_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        c_ids = continuation
        if isinstance(continuation, str):
            c_ids = self.encode(continuation, add_special_tokens=False)
        if not c_ids:
            return ScoreOutput(p_ids, [], [], [])
        logits = self.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(p_ids) - 1 : -1], -1)
        lps = [float(logp[i, t]) for i, t in enumerate(c_ids)]
        return ScoreOutput(p_ids, c_ids, lps, [int(x) for x in logp.argmax(-1)])


def _make_backend(path, name):
    try:
        from ditto.backends.transformers import TransformersBackend  # type: ignore[import-not-found]
    except ImportError:
        return MiniHFBackend(path, name)
    try:
        return TransformersBackend(str(path))
    except Exception:  # noqa: BLE001 - its constructor may differ; the protocol is what matters
        return MiniHFBackend(path, name)


class Counting:
    """Counts independently what the wrapped backend returned."""

    def __init__(self, inner):
        self.inner = inner
        self.name = getattr(inner, "name", "backend")
        self.generated = 0
        self.scored = 0
        self.calls = 0

    def generate(self, prompts, params, *, progress=False):
        outs = self.inner.generate(prompts, params)
        self.calls += 1
        self.generated += sum(len(c.token_ids) for ro in outs for c in ro.outputs)
        return outs

    def score(self, prompt, continuation):
        out = self.inner.score(prompt, continuation)
        self.calls += 1
        self.scored += len(out.token_ids)
        return out

    def encode(self, text, add_special_tokens=True):
        return self.inner.encode(text, add_special_tokens)

    def decode(self, ids):
        return self.inner.decode(ids)

    def chat_prompt(self, messages, add_generation_prompt=True):
        return self.inner.chat_prompt(messages, add_generation_prompt)

    def info(self):
        return self.inner.info()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds contention
    small = _build_model_dir(tmp_path_factory.mktemp("small"), seed=0, hidden=32)
    large = _build_model_dir(tmp_path_factory.mktemp("large"), seed=1, hidden=64)
    yield _make_backend(small, "small"), _make_backend(large, "large")
    torch.set_num_threads(threads)


class StepLengthPRM:
    """A rule-based PRM plug-in: shorter steps score higher."""

    def step_scores(self, problem, steps):
        return [1.0 / (1.0 + len(s) / 50.0) for s in steps]


PROBLEM = "What is 2 + 3?"
BUDGET = Budget(max_tokens=24, max_samples=4)


def _check(result: Result, *counters: Counting):
    assert isinstance(result, Result) and isinstance(result.cost, Cost)
    assert result.answer is None or isinstance(result.answer, str)
    assert isinstance(result.trace, dict) and "strategy" in result.trace
    c = result.cost
    assert c.generated_tokens == sum(x.generated for x in counters)
    assert c.scored_tokens == sum(x.scored for x in counters)
    assert c.model_calls == sum(x.calls for x in counters)
    assert c.wall_time_s > 0
    assert c.generated_tokens > 0


SINGLE = {
    "greedy": {},
    "self_consistency": {"n": 4},
    "best_of_n": {"n": 3},
    "weighted_majority": {"n": 3, "scorer": PRMScorer(StepLengthPRM(), "min")},
    "beam_search": {"beam_width": 2, "expand": 2, "max_steps": 2, "step_tokens": 8},
    "astar": {"k": 2, "max_expansions": 3, "step_tokens": 8, "scorer": PRMScorer(StepLengthPRM(), "prod")},
    "early_rejection": {"m": 4, "keep": 2, "prefix_tokens": 3, "step_tokens": 8, "max_steps": 2},
    "early_exit": {"checkpoint_tokens": 8, "probe_tokens": 4},
    "tool_integrated": {"max_turns": 2},
    "program_of_thought": {},
    "code_self_verification": {"n": 2, "max_turns": 1},
}


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_strategy_cost_accounting(models, name):
    small, _ = models
    proxy = Counting(small)
    result = get_strategy(name, **SINGLE[name]).run(PROBLEM, proxy, BUDGET)
    _check(result, proxy)
    assert result.trace["strategy"] == name


def test_registry_lists_everything():
    assert set(SINGLE) | {"chunk_guided", "glimp_router"} <= set(available_strategies())
    with pytest.raises(KeyError):
        get_strategy("no-such-strategy")


def test_second_model_likelihood_scorer(models):
    small, large = models
    ps, pl = Counting(small), Counting(large)
    result = get_strategy("best_of_n", n=3, scorer=LikelihoodScorer(pl)).run(PROBLEM, ps, BUDGET)
    _check(result, ps, pl)
    assert pl.scored > 0 and pl.generated == 0 and ps.scored == 0
    assert all(0.0 <= s <= 1.0 for s in result.trace["scores"])


@pytest.mark.parametrize("mode", ["lgs", "cgs"])
def test_chunk_guided(models, mode):
    small, large = models
    ps, pl = Counting(small), Counting(large)
    result = ChunkGuided(pl, mode=mode, k=3, chunk_tokens=4, max_chunks=3).run(PROBLEM, ps, BUDGET)
    _check(result, ps, pl)
    assert pl.generated == 0 and pl.scored > 0
    assert len(result.trace["chunks"]) >= 1
    # the chosen chunk is the best-scoring one
    for ch in result.trace["chunks"]:
        assert ch["scores"][ch["chosen"]] == max(ch["scores"])


def test_glimp_router_routes_by_entropy(models):
    small, large = models
    ps, pl = Counting(small), Counting(large)
    always_large = GlimpRouter(pl, threshold=-1.0, step_tokens=6, max_steps=2).run(PROBLEM, ps, BUDGET)
    _check(always_large, ps, pl)
    assert {s["model"] for s in always_large.trace["steps"]} == {"large"}
    ps2, pl2 = Counting(small), Counting(large)
    never = GlimpRouter(pl2, threshold=math.inf, step_tokens=6, max_steps=2).run(PROBLEM, ps2, BUDGET)
    _check(never, ps2, pl2)
    assert pl2.calls == 0 and {s["model"] for s in never.trace["steps"]} == {"small"}


def test_glimp_threshold_calibration(models):
    small, _ = models
    problems = ["1 + 1?", "2 * 3?", "7 - 4?"]
    t_all = calibrate_glimp_threshold(small, problems, large_fraction=1.0, max_steps=2, step_tokens=4)
    t_none = calibrate_glimp_threshold(small, problems, large_fraction=0.0, max_steps=2, step_tokens=4)
    t_half = calibrate_glimp_threshold(small, problems, large_fraction=0.5, max_steps=2, step_tokens=4)
    assert t_all <= t_half <= t_none


def test_entropy_of_top_logprobs():
    assert first_token_entropy({1: math.log(0.5), 2: math.log(0.5)}) == pytest.approx(math.log(2))
    # renormalised: the missing mass does not count
    assert first_token_entropy({1: math.log(0.25), 2: math.log(0.25)}) == pytest.approx(math.log(2))
    assert first_token_entropy({1: 0.0}) == pytest.approx(0.0)


def test_budget_caps_generated_tokens(models):
    small, _ = models
    proxy = Counting(small)
    budget = Budget(max_generated_tokens=20, max_tokens=16, max_samples=8)
    result = get_strategy("self_consistency", n=8).run(PROBLEM, proxy, budget)
    assert result.cost.generated_tokens == proxy.generated <= 20
    proxy = Counting(small)
    result = get_strategy("beam_search", beam_width=2, expand=2, max_steps=10, step_tokens=8).run(
        PROBLEM, proxy, Budget(max_generated_tokens=30, max_tokens=64)
    )
    assert result.cost.generated_tokens == proxy.generated <= 30


def test_strategies_are_reproducible(models):
    small, _ = models
    a = get_strategy("self_consistency", n=3, seed=7).run(PROBLEM, small, BUDGET)
    b = get_strategy("self_consistency", n=3, seed=7).run(PROBLEM, small, BUDGET)
    assert a.answer == b.answer and a.trace["answers"] == b.trace["answers"]
    assert a.cost.generated_tokens == b.cost.generated_tokens


# Voting and answers ----------------------------------------------------------------------------


def test_majority_vote_on_constructed_answers():
    v = majority_vote(["2", "3", "2.0", None, "3", "2"])
    assert v.answer == "2" and v.count == 3
    v = majority_vote(["\\frac{1}{2}", "0.5", "1/2", "7", "7"])
    assert v.answer == "\\frac{1}{2}" and v.count == 3
    # weights flip the winner
    v = majority_vote(["5", "5", "6"], [0.1, 0.1, 0.9])
    assert v.answer == "6" and v.weight == pytest.approx(0.9)
    # ties go to the class seen first
    assert majority_vote(["a", "b", "b", "a"]).answer == "a"
    assert majority_vote([None, None]).answer is None


def test_answer_extraction():
    assert extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("The final answer is $42$. I hope") == "42"
    assert is_equivalent(extract_answer("first 3 then 1,000"), "1000")
    assert extract_answer("nothing here") is None
    assert is_equivalent("0.5", "\\dfrac{1}{2}")
    assert not is_equivalent("0.5", "0.6")
    assert probe_answer("12} and more") == "12"
    assert probe_answer("\\frac{1}{2}}") == "\\frac{1}{2}"


def test_split_steps():
    text = "Step 1.\n\nStep 2.\n\n\nStep 3."
    steps = split_steps(text)
    assert steps == ["Step 1.\n\n", "Step 2.\n\n\n", "Step 3."] and "".join(steps) == text
    assert "".join(split_steps("abcdefg", 3)) == "abcdefg"


def _completion(text: str, finish: str, stop=None) -> CompletionOutput:
    return CompletionOutput(0, text, [1] * len(text), [0.0] * len(text), finish, stop_reason=stop)


def test_step_helpers_extend_and_pick_partials():
    assert step_params("blank_line", 8, 2, 0.7, 5).stop == ("\n\n",)
    assert step_params(4, 8, 1, 0.0, 0).max_tokens == 4 and step_params(4, 8, 1, 0.0, 0).stop == ()
    with pytest.raises(ValueError):
        step_params("sentence", 8, 1, 0.0, 0)
    root = Partial()
    step = extend(root, _completion("a", "stop", "\n\n"), max_tokens=10)
    assert (step.steps, step.tokens, step.done) == (["a\n\n"], 1, False)
    cut = extend(step, _completion("bc", "length"), max_tokens=10)
    assert (cut.text, cut.done) == ("a\n\nbc", False)
    assert extend(step, _completion("b", "stop", 0), max_tokens=10).done  # end of sequence
    assert extend(step, _completion("bcdefghij", "length"), max_tokens=10).done  # the length cap
    lengthen(cut, _completion("d", "stop", "\n\n"), max_tokens=10)
    assert (cut.steps, cut.tokens, cut.done) == (["a\n\n", "bcd\n\n"], 4, False)
    step.score, cut.score = 0.5, 0.5
    assert best([step, cut]) is step and solution(None) == (None, "") and best([]) is None
    assert solution(Partial(["x = \\boxed{5}"])) == ("5", "x = \\boxed{5}")


# Tool use ---------------------------------------------------------------------------------------

FAST = SandboxLimits(timeout_s=5.0, cpu_s=5)


def test_tool_session_runs_code_and_appends_output():
    s = ToolSession(limits=FAST)
    assert s.add_turn("Compute.\n```python\nprint(2 + 3)\n```\n", wants_output=True) == "executed"
    assert s.context().endswith("```output\n5\n```\n")
    assert s.add_turn("So the answer is \\boxed{5}.", wants_output=False) == "final"


def test_prune_tir_drops_failed_call_after_success():
    s = ToolSession(stuck_k=3, suspend_r=5, limits=FAST)
    s.add_turn("Try.\n```python\nprint(1/0)\n```\n", wants_output=True)
    assert "ZeroDivisionError" in s.context()
    s.add_turn("Again.\n```python\nprint(7)\n```\n", wants_output=True)
    assert "ZeroDivisionError" not in s.context() and "```output\n7\n```" in s.context()
    assert s.pruned == 1


def test_prune_tir_resamples_when_stuck_and_suspends():
    s = ToolSession(stuck_k=2, suspend_r=3, limits=FAST)
    assert s.add_turn("```python\nraise ValueError('a')\n```\n", True) == "executed"
    assert s.add_turn("```python\nraise ValueError('b')\n```\n", True) == "resample"
    assert s.context() == "" and s.resamples == 1
    assert s.add_turn("```python\nraise ValueError('c')\n```\n", True) == "executed"
    assert s.suspended and "no longer available" in s.context()
    assert s.add_turn("```python\nprint(1)\n```\n", True) == "final"  # not executed any more
    assert s.runs == 3


class _Transcript:
    def chat_prompt(self, messages, add_generation_prompt=True):
        return messages


def test_tool_protocols_show_one_true_worked_example_unless_shots_0():
    """Each protocol's demonstration is a real run: its code prints what the demo claims."""
    from ditto.strategies.sandbox import run_code

    tir = run_code(extract_code(tools.TIR_DEMO), FAST)
    assert tir.ok and tir.stdout.strip() == tools.DEMO_ANSWER
    assert f"```output\n{tools.DEMO_ANSWER}\n```" in tools.TIR_DEMO
    assert "\\boxed{" + tools.DEMO_ANSWER + "}" in tools.TIR_DEMO
    assert run_code(extract_code(tools.POT_DEMO), FAST).stdout.strip() == tools.DEMO_ANSWER
    assert parse_verdict(run_code(extract_code(tools.VERIFY_DEMO), FAST)) == "true"

    msgs = tools.protocol_prompt(_Transcript(), tools.VERIFY_INSTRUCTION, tools.VERIFY_DEMO, problem="P?", answer="3")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert tools.DEMO_PROBLEM in msgs[0]["content"] and "Proposed answer: 75" in msgs[0]["content"]
    assert msgs[2]["content"] == tools.VERIFY_INSTRUCTION.format(problem="P?", answer="3")
    assert tools.protocol_prompt(_Transcript(), tools.POT_INSTRUCTION, None, problem="P?") == [
        {"role": "user", "content": tools.POT_INSTRUCTION.format(problem="P?")}
    ]
    with pytest.raises(ValueError, match="shots"):
        tools.ToolIntegrated(shots=2)


def test_code_helpers():
    assert extract_code("x\n```python\na = 1\n```\ny\n```python\nprint(a)\n```") == "print(a)\n"
    assert extract_code("no code") is None
    assert extract_code("print(3)", allow_bare=True) == "print(3)"
    from ditto.strategies.sandbox import run_code

    assert parse_verdict(run_code("print(2 + 3 == 5)", FAST)) == "true"
    assert parse_verdict(run_code("print(False)", FAST)) == "false"
    assert parse_verdict(run_code("1/0", FAST)) == "uncertain"
    assert parse_verdict(None) == "uncertain"
