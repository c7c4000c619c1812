"""The fixed-order bf16 linear (numerics/kernels/bf16_linear.py) vs torch's bf16 F.linear (oneDNN),
side by side in one run, at SmolLM2-135M shapes and M = 1 (decode) / 32 (batched decode).

    .venv/bin/python benchmarks/bf16_linear_bench.py [--threads 2] [--ms 1,32] [--isa all]

Prints microseconds per call (best of --reps timed loops) and the ratio torch / kernel (> 1: the
kernel is faster), per instruction-set path with --isa all. The machine may be shared: the load
average is printed; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from ditto.numerics.kernels import bf16_linear as bl
from ditto.numerics.kernels.batch_invariant import _kernel_linear, kernel_available, pack_weight

SHAPES = ((576, 1728), (576, 3072), (1536, 576), (576, 49152))  # (K, N): qkv-like, gate+up, down, lm_head


def _best_us(fn, reps: int, min_s: float = 0.2) -> float:
    fn()
    n, t = 1, 0.0
    while True:  # calibrate the loop length
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t > min_s / 4:
            break
        n *= 2
    best = t / n
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ms", default="1,32")
    ap.add_argument("--isa", default="best", help="best | all | one of the kernel's paths")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = bl.isa_paths()
    isas = [None] if args.isa == "best" else list(paths) if args.isa == "all" else [args.isa]
    print(f"threads={args.threads} load={os.getloadavg()} kernel={bl.kernel_status()} paths={paths}")
    g = torch.Generator().manual_seed(0)
    head = f"{'K->N':>12} {'M':>3} {'torch bf16 us':>14} {'fp32-chain us':>14}"
    print(head + "".join(f" {(i or 'kernel') + ' us':>16} {'ratio':>6}" for i in isas))
    with torch.inference_mode():
        for k, n in SHAPES:
            w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
            packed = bl.pack_weight(w)
            pw = pack_weight(w) if kernel_available() else None  # the old bf16 path: widened, fp32 chain
            for m in map(int, args.ms.split(",")):
                x = torch.randn(m, k, generator=g).bfloat16()
                t_torch = _best_us(lambda x=x, w=w: F.linear(x, w), args.reps)
                t_f32 = _best_us(lambda x=x, pw=pw: _kernel_linear(x, pw, None).bfloat16(), args.reps) if pw else 0
                row = f"{f'{k}->{n}':>12} {m:>3} {t_torch:>14.1f} {t_f32:>14.1f}"
                for isa in isas:
                    t = _best_us(lambda x=x, isa=isa, p=packed: bl.linear(x, p, isa=isa), args.reps)
                    row += f" {t:>16.1f} {t_torch / t:>6.2f}"
                print(row, flush=True)
    print(f"load after={os.getloadavg()}")


if __name__ == "__main__":
    main()
