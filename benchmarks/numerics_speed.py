"""Speed of each numerics mode's linear on the SmolLM2-135M shapes, side by side with fp32.

    .venv/bin/python benchmarks/numerics_speed.py [--threads N] [--modes fp32,bf16,...] [--budget 0.3]

For every (K -> N) projection shape of SmolLM2-135M (hidden 576, intermediate 1536, 9 heads / 3 KV
heads of 64, vocab 49152) and M in {1, 64} tokens, builds the mode's replacement of an nn.Linear
(random weights) and times its forward on an input in the mode's activation dtype. Reports the
minimum over repeats (the least-disturbed run; the box may be shared) in ms and the ratio to fp32
(<1 = faster). "w4/dequant" is the w4 mode with the per-call fp32 dequantisation backend instead
of torch's int4 kernel, for comparison.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from ditto.config import EXACT_NUMERICS
from ditto.numerics.base import get_mode, list_modes
from ditto.numerics.w4 import W4Linear

SHAPES = [  # (name, K, N)
    ("q/o_proj", 576, 576),
    ("k/v_proj", 576, 192),
    ("gate/up", 576, 1536),
    ("down", 1536, 576),
    ("lm_head", 576, 49152),
]

ORDER = ["fp32", "bf16", "fp16", "layercast", "int8", "w8a8", "w4", "w4-g128", "w4-asym", "w4-g128-asym", "mxint8"]


def _time(fn, budget_s: float, max_reps: int = 200) -> float:
    fn()  # warm up (kernel selection, packing caches)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 3 or (spent < budget_s and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best * 1e3


def build(mode_name: str, linear: nn.Linear) -> tuple[nn.Module, torch.dtype]:
    if mode_name == "w4/dequant":
        return W4Linear(linear, 32, True, backend="dequant"), torch.float32
    mode = get_mode(mode_name)
    return mode.convert_linear(copy.deepcopy(linear)), mode.act_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--modes", default=None, help="comma-separated modes (default: all + w4/dequant)")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per cell")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 64], help="token counts M")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.modes:
        modes = args.modes.split(",")
    else:
        names = [m for m in list_modes() if m != EXACT_NUMERICS]  # integer is calibrated per model: exact_vs_fp32.py
        modes = [m for m in ORDER if m in names] + [m for m in names if m not in ORDER] + ["w4/dequant"]
    if "fp32" not in modes:
        modes.insert(0, "fp32")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; min ms per call (ratio to fp32)")

    results: dict[tuple[str, int], dict[str, float]] = {}
    torch.manual_seed(0)
    for shape_name, k, n in SHAPES:
        linear = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            linear.weight.normal_(0, k**-0.5)
        for mode_name in modes:
            mod, act = build(mode_name, linear)
            for m in args.ms:
                x = torch.randn(m, k).to(act)
                with torch.inference_mode():
                    results.setdefault((shape_name, m), {})[mode_name] = _time(lambda mod=mod, x=x: mod(x), args.budget)
            del mod

    cols = [f"{s} M={m}" for s, _, _ in SHAPES for m in args.ms]
    keys = [(s, m) for s, _, _ in SHAPES for m in args.ms]
    width = max(16, *(len(c) for c in cols))
    print(f"{'mode':<14}" + "".join(f"{c:>{width}}" for c in cols))
    for mode_name in modes:
        cells = []
        for key in keys:
            t, ref = results[key][mode_name], results[key]["fp32"]
            cells.append(f"{t:8.3f} ({t / ref:4.2f}x)")
        print(f"{mode_name:<14}" + "".join(f"{c:>{width}}" for c in cells))


if __name__ == "__main__":
    main()
