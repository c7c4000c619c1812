"""The GPU checks of the determinism issue in one short run (for a session that has a GPU).

1. the CUDA tests of the suite (tests/test_determinism.py -k cuda: needle in a batch, 200
   identical requests, tiny models);
2. on a random-weight model of SmolLM2-135M's shape (and optionally a bigger one), bf16 and fp32:
   one prompt alone vs the same prompt inside a batch of 32 others — bitwise equal logprobs for
   `batch_invariant`, and how many differ for `fast` and for HF transformers;
3. throughput, batch of 64 x 128 new tokens (EOS ignored): ditto fast, ditto batch_invariant and HF
   transformers `generate`, same device, same dtype, side by side;
4. `exact` (integer numerics) on the GPU: the CUDA tests of tests/test_exact.py (every tiny family,
   greedy and sampled, token ids / logprobs / integer logits equal to the CPU's, a GPU receipt
   verified on the CPU), the same at each shape (greedy and sampled batch, GPU vs CPU), and its
   throughput on the GPU against ditto bf16 `fast` and against itself on the CPU (--skip-exact: off).

Usage on the GPU machine (its python3 has torch, transformers, tokenizers, numpy, jinja2 and tqdm,
which is all `ditto.LLM` needs for an HF folder; no wheels to carry):
    PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {  # Llama-family shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "qwen2-1.5b-like": (1536, 8960, 28, 12, 2, 151936),
}


def build(root: Path, shape: str) -> Path:
    import transformers as tf
    from tiny_models import _tokenizer

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    path = root / shape
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=0,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    _tokenizer(path, 384)
    return path


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab, (int(torch.randint(20, 200, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def needle(path: Path, numerics: str, determinism: str) -> dict:
    from ditto import LLM, SamplingParams

    llm = LLM(str(path), numerics=numerics, determinism=determinism, device="cuda", progress=False, max_num_seqs=64)
    vocab = llm.loaded.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    target = prompts(1, vocab, 1)[0]
    alone = llm.generate([target], params)[0].outputs[0]
    others = prompts(32, vocab, 2)
    busy = llm.generate(others[:16] + [target] + others[16:], params)[16].outputs[0]
    lp_a, lp_b = torch.tensor(alone.logprobs), torch.tensor(busy.logprobs)
    first = next((i for i, (a, b) in enumerate(zip(alone.token_ids, busy.token_ids)) if a != b), None)
    return {
        "bitwise_equal": alone.token_ids == busy.token_ids and torch.equal(lp_a, lp_b),
        "logprobs_differing": int((lp_a != lp_b).sum()) if len(lp_a) == len(lp_b) else None,
        "first_divergent_token": first,
    }


def hf_needle(path: Path, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    vocab = model.config.vocab_size
    target = torch.tensor(prompts(1, vocab, 1)[0], device="cuda")
    others = [torch.tensor(p, device="cuda") for p in prompts(32, vocab, 2)]
    width = max(len(p) for p in others + [target])
    batch = torch.zeros(33, width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(batch)
    for i, p in enumerate(others[:16] + [target] + others[16:]):
        batch[i, width - len(p) :], mask[i, width - len(p) :] = p, 1  # left padding
    with torch.no_grad():
        alone = model(target[None]).logits[0, -1]
        inside = model(batch, attention_mask=mask).logits[16, -1]
    return {"last_logits_differing_fraction": float((alone != inside).float().mean())}


def throughput(path: Path, numerics: str, batch: int, new: int) -> dict:
    from transformers import AutoModelForCausalLM

    from ditto import LLM, SamplingParams

    ps = prompts(batch, 30000, 3)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    out = {}
    for det in ("fast", "batch_invariant"):
        llm = LLM(str(path), numerics=numerics, determinism=det, device="cuda", progress=False, max_num_seqs=batch)
        llm.generate(ps[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(ps, params)
        torch.cuda.synchronize()
        out[f"ditto_{det}_tok_s"] = batch * new / (time.perf_counter() - t)
        del llm
    dtype = torch.bfloat16 if numerics == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    width = max(len(p) for p in ps)
    ids = torch.zeros(batch, width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, p in enumerate(ps):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.generate(ids[:4], attention_mask=mask[:4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, attention_mask=mask, **kw)
    torch.cuda.synchronize()
    out["hf_generate_tok_s"] = batch * new / (time.perf_counter() - t)
    out["batch_invariant_overhead"] = out["ditto_fast_tok_s"] / out["ditto_batch_invariant_tok_s"] - 1
    return out


def exact_row(path: Path, batch: int, new: int, cpu_batch: int = 8) -> dict:
    """`exact` at a shape: GPU == CPU on a mixed greedy/sampled batch, and tokens/s on each device."""
    from ditto import LLM, SamplingParams

    ps = prompts(batch, 30000, 3)
    mixed = [
        SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=32, ignore_eos=True, logprobs=1)
        for i in range(cpu_batch)
    ]
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    row: dict = {}
    outs = {}
    for device in ("cpu", "cuda"):
        t = time.perf_counter()
        llm = LLM(str(path), numerics="integer", determinism="exact", device=device, progress=False, max_num_seqs=batch)
        row[f"{device}_load_s"] = time.perf_counter() - t  # the first load calibrates (CPU float forward)
        outs[device] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(ps[:cpu_batch], mixed)]
        n = batch if device == "cuda" else cpu_batch
        llm.generate(ps[:2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(ps[:n], greedy)
        if device == "cuda":
            torch.cuda.synchronize()
        row[f"{device}_tok_s"] = n * new / (time.perf_counter() - t)
        row[f"{device}_batch"] = n
        del llm
    row["cuda_equals_cpu"] = outs["cpu"] == outs["cuda"]
    row["first_difference"] = next((i for i, (a, b) in enumerate(zip(outs["cpu"], outs["cuda"])) if a != b), None)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--shapes", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-exact", action="store_true", help="leave out the `exact` (integer) checks")
    args = ap.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_tests:
        t = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_determinism.py",
                "tests/test_exact.py",
                "-k",
                "cuda",
            ],  # fmt: skip
            capture_output=True,
            text=True,
        )
        report["cuda_tests"] = {"rc": proc.returncode, "tail": proc.stdout[-1500:], "s": time.perf_counter() - t}
        print(proc.stdout[-1500:], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            path = build(Path(tmp), shape)
            for numerics in ("bf16", "fp32"):
                row = {det: needle(path, numerics, det) for det in ("fast", "batch_invariant")}
                row["hf"] = hf_needle(path, torch.bfloat16 if numerics == "bf16" else torch.float32)
                row["throughput"] = throughput(path, numerics, args.batch, args.new_tokens)
                report[f"{shape}/{numerics}"] = row
                print(shape, numerics, json.dumps(row), flush=True)
            if not args.skip_exact:
                row = exact_row(path, args.batch, args.new_tokens)
                bf16 = report[f"{shape}/bf16"]["throughput"]["ditto_fast_tok_s"]
                row["exact_vs_bf16_fast"] = row["cuda_tok_s"] / bf16
                report[f"{shape}/exact"] = row
                print(shape, "exact", json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
