"""Is `exact` really exact across machines? Write a reference on one machine, check it on another.

    python benchmarks/cross_machine_check.py write xcheck/      # here: tiny model + reference outputs
    python benchmarks/cross_machine_check.py check xcheck/      # elsewhere (other CPU, other torch, a GPU host)

The reference holds, for a tiny random-weight Qwen3-family model (its calibration file travels
with it): integer logits of teacher-forced passes, greedy and sampled token ids in `exact`
mode, and fp32 `batch_invariant` token ids and logprobs (whose promise is per CPU type only, so
a difference there across CPU vendors is reported, not a failure). With CUDA present, the integer
kernels are also compared between the CPU and the GPU on random inputs, bit for bit.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = [[5, 17, 33, 90, 120, 7, 8, 9] * 4, list(range(20, 80)), [300, 12, 250, 99, 3, 4]]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(model_dir: Path) -> dict:
    from ditto import LLM, SamplingParams

    out: dict = {"platform": f"{_cpu_name()}, {torch.get_num_threads()} threads", "torch": str(torch.__version__)}
    llm = LLM(str(model_dir), numerics="integer", determinism="exact", progress=False)
    sampler = llm.numerics.sample
    out["digest"] = llm.model_digest
    out["int_logits"] = [
        sampler.logits_int(row)[0] if hasattr(sampler, "logits_int") else row
        for p in PROMPTS
        for row in llm.score(p[:4], p[4:], keep_logits=True).logits
    ]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True, n=2)
    out["exact_greedy"] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    out["exact_sampled"] = [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, sampled)]
    bi = LLM(str(model_dir), numerics="fp32", determinism="batch_invariant", progress=False)
    outs = bi.generate(PROMPTS, SamplingParams(temperature=0.7, seed=3, max_tokens=24, ignore_eos=True))
    out["bi_tokens"] = [o.outputs[0].token_ids for o in outs]
    out["bi_logprobs"] = [o.outputs[0].logprobs for o in outs]
    return out


def _cuda_kernels() -> list[tuple[str, bool]]:
    from ditto.numerics.kernels import integer_ops as iops

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (37, 640), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (200, 640), generator=g, dtype=torch.int8)
    x = torch.randint(-(2**20), 2**20, (64, 333), generator=g)
    n = torch.randint(0, 2**62, (5000,), generator=g)
    cases = {
        "int8_matmul": lambda d: iops.int8_matmul(a.to(d), w.to(d)),
        "softmax_int": lambda d: iops.softmax_int(x.to(d), 16),
        "silu_int": lambda d: iops.silu_int(x.to(d), 16),
        "gelu_tanh_int": lambda d: iops.gelu_tanh_int(x.to(d), 16),
        "exp_neg_fixed": lambda d: iops.exp_neg_fixed(-x.abs().to(d), 16),
        "isqrt": lambda d: iops.isqrt(n.to(d)),
        "log_softmax_int": lambda d: iops.log_softmax_int(x.to(d), 16),
    }
    return [(name, torch.equal(f("cpu"), f("cuda").cpu())) for name, f in cases.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["write", "check"])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    model_dir = args.folder / "model"
    if args.action == "write":
        from tiny_models import make_tiny_model

        args.folder.mkdir(parents=True, exist_ok=True)
        make_tiny_model(model_dir, "qwen3", seed=11)
        torch.save(_run(model_dir), args.folder / "reference.pt")
        print(f"reference written to {args.folder}")
        return 0
    ref = torch.load(args.folder / "reference.pt")
    here = _run(model_dir)
    print(f"reference: {ref['platform']} torch {ref['torch']}; here: {here['platform']} torch {here['torch']}")
    rows = [
        ("model digest (weights + calibration)", ref["digest"] == here["digest"]),
        ("exact: integer logits", all(torch.equal(a, b) for a, b in zip(ref["int_logits"], here["int_logits"]))),
        ("exact: greedy token ids", ref["exact_greedy"] == here["exact_greedy"]),
        ("exact: sampled token ids (T=0.7, top-p, n=2)", ref["exact_sampled"] == here["exact_sampled"]),
        ("batch_invariant fp32 tokens (promise: same CPU type)", ref["bi_tokens"] == here["bi_tokens"]),
        ("batch_invariant fp32 logprobs (same CPU type)", ref["bi_logprobs"] == here["bi_logprobs"]),
    ]
    if torch.cuda.is_available():
        rows += [(f"CUDA vs CPU integer kernel {name}", ok) for name, ok in _cuda_kernels()]
    for what, ok in rows:
        print(f"{'SAME ' if ok else 'DIFF '} {what}")
    exact_ok = all(ok for what, ok in rows if not what.startswith("batch_invariant"))
    return 0 if exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
