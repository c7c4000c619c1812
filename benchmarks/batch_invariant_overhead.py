"""Overhead of ditto's batch-invariant linear vs torch's default F.linear on the engine's shapes.

Usage: .venv/bin/python benchmarks/batch_invariant_overhead.py [--threads 2] [--reps 15]

Timing: baseline and candidate are interleaved and the minimum over reps is kept (robust to other
processes sharing the CPU).  Ratio = invariant / F.linear (1.00 = no overhead).
Modes: fp32 (fp32 x, fp32 W); bf16 (bf16 x, bf16 W); layercast (fp32 x, bf16 W in memory; the
baseline is F.linear with the weight pre-widened to fp32, i.e. the fast layercast path).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ditto.numerics.kernels import batch_invariant as bi

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
MS = [1, 16, 64, 256, 2048]


def _bench(fns, reps: int) -> list[float]:
    best = [float("inf")] * len(fns)
    for f in fns:
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return [b * 1e6 for b in best]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--modes", default="fp32,bf16,layercast")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} threads={args.threads} kernel={bi.kernel_status()}")
    ms = [int(m) for m in args.ms.split(",")]
    print(f"{'mode':9s} {'K':>5s} {'N':>6s} | " + " | ".join(f"M={m:<5d} us(base) ratio" for m in ms))
    for mode in args.modes.split(","):
        for k, n in SHAPES:
            g = torch.Generator().manual_seed(0)
            w32 = torch.randn(n, k, generator=g) / k**0.5
            xs32 = torch.randn(max(ms), k, generator=g)
            if mode == "fp32":
                w, wbase, xs = w32, w32, xs32
            elif mode == "bf16":
                w = wbase = w32.bfloat16()
                xs = xs32.bfloat16()
            else:
                w, xs = w32.bfloat16(), xs32
                wbase = w.float()
            packed = bi.pack_weight(w)
            cells = []
            for m in ms:
                x = xs[:m]
                reps = args.reps if m * n * k < 2e9 else max(3, args.reps // 5)
                fns = [
                    lambda x=x, wb=wbase: F.linear(x, wb),
                    lambda x=x, w=w, p=packed: bi.invariant_linear(x, w, packed=p),
                ]
                base, inv = _bench(fns, reps)
                cells.append(f"{base:10.0f} {inv / base:5.2f}")
            print(f"{mode:9s} {k:5d} {n:6d} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
