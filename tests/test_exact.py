"""Determinism level `exact` (numerics `integer`) through the public LLM API on tiny random models:
bit-identical token ids and integer logits whatever the batch, chunking, prefix cache and thread
count; integer sampling; the calibration file and the model digest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ditto import LLM, SamplingParams
from ditto.numerics import calibration as cal
from ditto.numerics import integer_engine

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=11, max_tokens=8, ignore_eos=True)


def exact_llm(path, **opts) -> LLM:
    opts.setdefault("num_kv_blocks", 256)
    return LLM(str(path), numerics="integer", determinism="exact", progress=False, **opts)


class Recorder:
    """Wraps the engine's sample hook: keeps the integer logits of every sampling step, per prompt."""

    def __init__(self, llm: LLM):
        self.inner, self.mode, self.rows = llm.engine.sample, llm.numerics.mode, {}
        llm.engine.sample = self

    def __call__(self, logits, params, prompt_ids, output_ids, sample_index, token_index):
        self.rows.setdefault(tuple(prompt_ids), []).append(self.mode.logits_int(logits))
        return self.inner(logits, params, prompt_ids, output_ids, sample_index, token_index)


def _prompts(n: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_generates_every_family(tiny_dirs, family):
    llm = exact_llm(tiny_dirs[family])
    assert llm.numerics.kv_dtype == torch.int8 and llm.info()["determinism"] == "exact"
    prompts = _prompts(3, 1, llm.loaded.config.vocab_size)
    outs = llm.generate(prompts, [GREEDY, SAMPLED, GREEDY])
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert llm.generate(prompts[1], SAMPLED)[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_needle_in_a_batch(tiny_dirs):
    """One prompt alone vs among others joining mid-flight, chunked prefill 16 vs 512, prefix cache cold/warm."""
    path = tiny_dirs["qwen3"]
    alone_llm = exact_llm(path, enable_prefix_caching=False)
    vocab = alone_llm.loaded.config.vocab_size
    needle = _prompts(1, 2, vocab)[0] + list(range(3, 40))  # > 16 tokens: several chunks below
    rec = Recorder(alone_llm)
    alone = {p.seed: alone_llm.generate([needle], p)[0].outputs[0].token_ids for p in (GREEDY, SAMPLED)}
    ref_rows = rec.rows[tuple(needle)]  # greedy then sampled: 16 rows

    busy = exact_llm(path, prefill_chunk=16, max_num_batched_tokens=48, max_num_seqs=8)
    rec = Recorder(busy)
    eng = busy.engine
    others = _prompts(6, 3, vocab)
    for i, p in enumerate(others[:3]):
        eng.add_request(f"a{i}", p, SamplingParams(temperature=0.9, seed=i, max_tokens=12, ignore_eos=True))
    eng.step()
    eng.step()
    eng.add_request("needle-g", needle, GREEDY)  # joins while the others are mid-flight
    for i, p in enumerate(others[3:]):
        eng.add_request(f"b{i}", p, GREEDY)
    eng.step()
    eng.add_request("needle-s", needle, SAMPLED)
    while eng.has_unfinished():
        eng.step()
    assert eng.requests["needle-g"].seqs[0].output_ids == alone[None]
    assert eng.requests["needle-s"].seqs[0].output_ids == alone[11]
    got = rec.rows[tuple(needle)]
    assert len(got) == len(ref_rows) == 16
    # both needles ran in the same steps: compare as multisets of (step) rows via the greedy/sampled order
    assert all(any(torch.equal(g, r) for g in got) for r in ref_rows)

    warm = exact_llm(path, prefill_chunk=512)  # prefix cache on: second run reuses the first's blocks
    rec = Recorder(warm)
    warm.generate([needle[:30] + [5, 6]], GREEDY)
    out = warm.generate([needle], GREEDY)[0]
    assert out.metrics["cached_prompt_tokens"] >= 16
    assert out.outputs[0].token_ids == alone[None]
    assert all(torch.equal(a, b) for a, b in zip(rec.rows[tuple(needle)], ref_rows[:8]))


def test_score_logits_match_generation(tiny_dirs):
    llm = exact_llm(tiny_dirs["llama"])
    prompt = _prompts(1, 4, llm.loaded.config.vocab_size)[0]
    rec = Recorder(llm)
    toks = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    scored = llm.score(prompt, toks, keep_logits=True)
    ints = llm.numerics.mode.logits_int(scored.logits)
    assert torch.equal(ints, torch.stack(rec.rows[tuple(prompt)]))  # teacher-forced == incremental decode
    assert torch.equal(ints.double() * llm.numerics.mode.logit_scale, scored.logits.double())


_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(int(sys.argv[2]))
    from ditto import LLM, SamplingParams
    llm = LLM(sys.argv[1], numerics="integer", determinism="exact", progress=False)
    prompt = list(range(5, 30))
    cont = list(range(40, 60))
    ints = llm.numerics.mode.logits_int(llm.score(prompt, cont, keep_logits=True).logits)
    sp = SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True, n=2)
    out = llm.generate([prompt, prompt[:7]], [sp, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)])
    toks = [[c.token_ids for c in o.outputs] for o in out]
    print(json.dumps({"threads": torch.get_num_threads(), "logits": ints.tolist(), "tokens": toks,
                      "digest": llm.model_digest}))
    """
)


def test_identical_across_processes_and_threads(tiny_dirs):
    path = str(tiny_dirs["llama"])
    exact_llm(path)  # the calibration exists before the children start (they must reuse it)
    results = []
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, path, str(threads)], env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr[-3000:]
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    one, two = results
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["logits"] == two["logits"]
    assert one["tokens"] == two["tokens"]
    assert one["digest"] == two["digest"]
    assert one["tokens"][0][0] != one["tokens"][0][1]  # n=2 samples differ (different noise)


def test_integer_sampler_processing(tiny_dirs):
    llm = exact_llm(tiny_dirs["llama"])
    sampler, mode = llm.numerics.sample, llm.numerics.mode
    V = llm.loaded.config.vocab_size
    L = torch.arange(V, dtype=torch.int64) * 37 % 1001 - 500
    logits = L.float() * mode.logit_scale
    assert sampler(logits, SamplingParams(temperature=0), [], [], 0, 0) == int(L.argmax())
    keep_k = sampler.process(L, torch.ones(V, dtype=torch.bool), SamplingParams(temperature=1.0, top_k=5), [], [])[2]
    assert int(keep_k.sum()) == 5 and set(keep_k.nonzero().flatten().tolist()) == set(L.topk(5).indices.tolist())
    keep_p = sampler.process(L, torch.ones(V, dtype=torch.bool), SamplingParams(temperature=1.0, top_p=0.5), [], [])[2]
    probs = torch.softmax(L.double() * mode.logit_scale, -1)
    order = probs.argsort(descending=True)
    n_ref = int(((probs[order].cumsum(0) - probs[order]) < 0.5).sum())
    assert abs(int(keep_p.sum()) - n_ref) <= 1
    masked = logits.clone()
    masked[int(L.argmax())] = float("-inf")  # what the engine does for min_tokens: never chosen
    assert sampler(masked, SamplingParams(temperature=0), [], [], 0, 0) != int(L.argmax())
    pen = SamplingParams(temperature=0, repetition_penalty=1e6)
    assert sampler(logits, pen, [int(L.argmax())], [], 0, 0) != int(L.argmax())
    draws = {sampler(logits, SamplingParams(temperature=5.0, seed=1), [], [], 0, t) for t in range(20)}
    assert len(draws) > 1


def test_calibration_saved_reused_and_in_digest(tiny_dirs, tmp_path, monkeypatch):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dirs["qwen2"], model_dir)
    for f in model_dir.glob("*.int-calib"):
        f.unlink()
    first = exact_llm(model_dir)
    path = cal.calibration_path(model_dir)
    assert path.is_file() and first.numerics.info["calibration"] == str(path)
    digest = first.model_digest
    assert digest != first.loaded.digest  # the calibration is part of the model's identity

    def no_recalibration(*a, **k):
        raise AssertionError("calibration recomputed instead of reused")

    monkeypatch.setattr(integer_engine, "compute_calibration", no_recalibration)
    again = exact_llm(model_dir)
    assert again.model_digest == digest
    monkeypatch.undo()

    stats, meta = cal.load_calibration(path, with_metadata=True)
    stats["L0.gate"] = stats["L0.gate"] * 2
    cal.save_calibration(path, stats, {k: v for k, v in meta.items() if k != "version"})
    changed = exact_llm(model_dir)
    assert changed.model_digest != digest

    # a read-only model directory: the calibration goes to the user cache instead
    path.unlink()
    monkeypatch.setenv("DITTO_CACHE", str(tmp_path / "cache"))
    real_save = integer_engine._atomic_save

    def read_only(p, *a):
        if Path(p).parent == model_dir:
            raise PermissionError("read-only")
        return real_save(p, *a)

    monkeypatch.setattr(integer_engine, "_atomic_save", read_only)
    ro = exact_llm(model_dir)
    assert not path.exists() and Path(ro.numerics.info["calibration"]).is_relative_to(tmp_path / "cache")
    assert ro.model_digest != ro.loaded.digest
    ints = [llm.numerics.mode.logits_int(llm.score([5, 6, 7], [8, 9], keep_logits=True).logits) for llm in (again, ro)]
    assert ints[0].shape == ints[1].shape


@pytest.mark.slow
def test_smollm2_exact():
    llm = exact_llm("smollm2-135m-instruct", max_num_seqs=8)
    rec = Recorder(llm)
    prompts = ["What is 7 times 8?", "Name a colour.", "Write one word about the sea."]
    chat = [llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    batch = llm.generate(chat, [GREEDY, SAMPLED, GREEDY])
    rows = {k: list(v) for k, v in rec.rows.items()}
    rec.rows.clear()
    alone = llm.generate(chat[1], SAMPLED)[0]
    assert alone.outputs[0].token_ids == batch[1].outputs[0].token_ids
    key = tuple(llm.encode(chat[1]))
    assert all(torch.equal(a, b) for a, b in zip(rec.rows[key], rows[key]))
    assert "56" in batch[0].outputs[0].text or len(batch[0].outputs[0].token_ids) == 8


# ---------------------------------------------------------------- the accelerator's formulation
_DEVICE_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from ditto import LLM, SamplingParams
    from ditto.numerics.kernels import integer_ops as iops
    out = {"accelerator_path": iops.accelerator_path(torch.zeros(1))}
    for path in sys.argv[1:]:
        llm = LLM(path, numerics="integer", determinism="exact", progress=False, num_kv_blocks=256)
        g = torch.Generator().manual_seed(3)
        vocab = llm.loaded.config.vocab_size
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 29, 11, 40)]
        params = [
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7, max_tokens=12, ignore_eos=True, n=2,
                           logprobs=3),
            SamplingParams(temperature=1.0, min_p=0.05, seed=8, max_tokens=12, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
        ]
        res = llm.generate(prompts, params)  # one batch: decode rows of several sequences, prefill chunks
        toks = [[c.token_ids for c in o.outputs] for o in res]
        lps = [[[c.logprobs, [sorted(s.items()) for s in c.top_logprobs]] for c in o.outputs] for o in res]
        scored = llm.score(prompts[1], toks[1][0], keep_logits=True)
        ints = llm.numerics.mode.logits_int(scored.logits)
        out[path] = {"tokens": toks, "logprobs": lps, "int_logits": ints.tolist(), "digest": llm.model_digest}
    print(json.dumps(out))
    """
)


def test_accelerator_formulation_gives_the_cpu_bits(tiny_dirs):
    """What a GPU computes (torch ops, _int_mm on padded operands, float64 batched GEMMs; no C kernel)
    equals what the CPU's C kernels compute, bit for bit: token ids (greedy and sampled), logprobs and
    the integer logits, for every family, in a mixed batch. This is the cross-device promise of
    `exact`, checked on every commit without a GPU (the GPU run itself: benchmarks/gpu_check.py)."""
    paths = [str(tiny_dirs[f]) for f in ("llama", "qwen2", "qwen3", "gemma3")]
    for p in paths:
        exact_llm(p)  # calibrations exist before the children start
    runs = []
    for accel in ("0", "1"):
        env = {**os.environ, "DITTO_INT_ACCELERATOR_PATH": accel}
        res = subprocess.run(
            [sys.executable, "-c", _DEVICE_CHILD, *paths], env=env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    cpu, accel = runs
    assert (cpu.pop("accelerator_path"), accel.pop("accelerator_path")) == (False, True)
    for p in paths:
        assert accel[p]["tokens"] == cpu[p]["tokens"], p
        assert accel[p]["logprobs"] == cpu[p]["logprobs"], p
        assert accel[p]["int_logits"] == cpu[p]["int_logits"], p
        assert accel[p]["digest"] == cpu[p]["digest"], p
        assert cpu[p]["tokens"][1][0] != cpu[p]["tokens"][1][1]  # the two samples differ: sampling ran


def test_float64_batched_gemm_is_the_int32_one(monkeypatch):
    """_bmm_exact's accelerator form (float64) against the CPU's int32 GEMM at the operand bounds
    attention uses: int8 q.k and Q20 probabilities times int8 values over 4096 keys."""
    from ditto.numerics.kernels import integer_ops as iops

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (3, 2, 5, 64), generator=g, dtype=torch.int8)
    k = torch.randint(-127, 128, (3, 2, 64, 4096), generator=g, dtype=torch.int8)
    w = torch.randint(0, 1000, (3, 2, 5, 4096), generator=g) ** 3
    p = w * (1 << 20) // w.sum(-1, keepdim=True)  # Q20 probabilities: each row sums to <= 2^20
    v = torch.randint(90, 128, (3, 2, 4096, 64), generator=g, dtype=torch.int8)  # same signs: the largest sums
    v[0] = -v[0]
    want = [iops._bmm_exact(q, k), iops._bmm_exact(p, v)]
    monkeypatch.setenv(iops.ACCELERATOR_ENV, "1")
    got = [iops._bmm_exact(q, k), iops._bmm_exact(p, v)]
    for a, b in zip(want, got):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b)
    assert int(want[1].abs().max()) > 1 << 24  # beyond float32's exact integers: float64 is needed


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_integer_model_moves_whole(tiny_dirs, family):
    """IntegerMode.apply(model, device) leaves no tensor behind on the CPU: every tensor reachable from
    the model's modules (attributes, lists, tuples, dicts, at any depth) is on the target device; only the
    C kernels' own parameter blocks (kparams, read by CPU kernels alone) stay. ("meta" stands in for a GPU.)"""
    import gc

    from ditto.loader.load import load
    from ditto.numerics.integer import IntegerMode

    loaded = load(tiny_dirs[family], progress=False)
    stats, _ = integer_engine.load_or_calibrate(loaded)
    model = IntegerMode(stats).apply(loaded.model, "meta")
    seen, found = set(), []

    def walk(obj, where, depth=0):
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append((where, obj.device.type))
            return
        if isinstance(obj, (list, tuple, dict)) or hasattr(obj, "__dataclass_fields__"):
            for ref in gc.get_referents(obj):
                walk(ref, where, depth + 1)

    for name, module in model.named_modules():
        if type(module).__name__.startswith("Int") or name == "":
            for attr, value in vars(module).items():
                if attr not in ("_modules", "kparams") and not attr.startswith("__"):
                    walk(value, f"{name}.{attr}")
    assert found and all(dev == "meta" for _, dev in found), [w for w, d in found if d != "meta"][:10]


def test_receipts_verify_exact_across_formulations(tiny_dirs, tmp_path):
    """A sampled `exact` receipt made by the accelerator's formulation verifies `exact` on the CPU's C
    kernels, and one made on the CPU verifies `exact` on the accelerator's formulation (the CLI, as an
    auditor runs it), with the same tokens both ways."""
    path = str(tiny_dirs["qwen3"])
    exact_llm(path)
    gen = [sys.executable, "-m", "ditto.cli", "generate", "--model", path, "--determinism", "exact", "--raw",
           "--temperature", "0.8", "--seed", "3", "--max-tokens", "10", "--fingerprint-k", "8"]  # fmt: skip
    texts = []
    for maker, checker in (("1", "0"), ("0", "1")):
        receipt = tmp_path / f"made-{maker}.json"
        env = {**os.environ, "DITTO_INT_ACCELERATOR_PATH": maker}
        res = subprocess.run([*gen, "--receipt", str(receipt), "The quick brown fox"], env=env, capture_output=True)
        assert res.returncode == 0, res.stderr[-2000:]
        env = {**os.environ, "DITTO_INT_ACCELERATOR_PATH": checker}
        res = subprocess.run(
            [sys.executable, "-m", "ditto.cli", "verify", str(receipt), "--json"], env=env, capture_output=True
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        (result,) = json.loads(res.stdout)["results"]
        assert result["status"] == "exact" and result["n_tokens"] == 10
        texts.append(json.loads(receipt.read_text())["output_token_ids"])
    assert texts[0] == texts[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU suite checks its formulation)")
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_cuda_matches_cpu(tiny_dirs, family):
    """device=cuda against device=cpu, greedy and sampled in one batch: token ids, logprobs and integer
    logits equal (torch.equal / ==), and a receipt made on the GPU verifies `exact` on the CPU."""
    from ditto.verify.build import receipt_for
    from ditto.verify.replay import verify_receipt

    runs = {}
    for device in ("cpu", "cuda"):
        llm = exact_llm(tiny_dirs[family], device=device)
        prompts = _prompts(4, 21, llm.loaded.config.vocab_size)
        params = [GREEDY, SAMPLED, SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True), GREEDY]
        outs = llm.generate(prompts, params)
        scored = llm.score(prompts[1], outs[1].outputs[0].token_ids, keep_logits=True)
        runs[device] = (llm, outs, params, llm.numerics.mode.logits_int(scored.logits))
    (cpu, cpu_outs, params, cpu_ints), (gpu, gpu_outs, _, gpu_ints) = runs["cpu"], runs["cuda"]
    assert torch.equal(cpu_ints, gpu_ints.cpu())
    for a, b in zip(cpu_outs, gpu_outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    receipt = receipt_for(gpu, gpu_outs[1], gpu_outs[1].outputs[0], params[1])
    assert receipt.hardware["device"].startswith("cuda")
    assert verify_receipt(cpu, receipt).status == "exact"
