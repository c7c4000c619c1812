"""GGUF linear kernels side by side on SmolLM2-135M's shapes: lookup tables (LUT) vs multiply-add (MAD).

    .venv/bin/python benchmarks/gguf_kernels.py [--threads 2] [--ms 1 32] [--budget 0.4] [--json PATH]

For every weight shape of SmolLM2-135M (Q4_1: q/o 576x576, k/v 192x576, gate/up 1536x576, down
576x1536; Q8_0: the 49152x576 embedding / LM head, for the MAD kernel only) and M in {1, 32} tokens,
times one call of:

* ``lut``: `gguf_lut.lut_linear` on the file's own rows (T-MAC-style tables, bit transpose in registers);
* ``lut-packed``: the same on `gguf_lut.repack`'s bit-plane layout (T-MAC's own layout; the one-off
  repack is timed apart and printed below the table);
* ``mad``: `gguf_blocks.block_linear`, the multiply-add (vpdpbusd) kernel, when it is importable;
* ``int4pack``: torch's ``_weight_int4pack_mm_for_cpu`` (the w4 numerics mode's kernel, called as
  numerics/w4.py does: bf16 activations in, bf16 out, then fp32), weights re-quantised to its layout;
* ``fp32``: ``F.linear`` on the dequantised fp32 weight.

The weights are the bundled model's own tensors (blk.0.*, token_embd) when the bundled GGUF is
installed, else random valid blocks of the same shapes. Each cell is the median of repeated calls
(at least 5, until --budget seconds); the machine may be shared, so the minimum is recorded too.
The table prints microseconds, the GB/s of the weight bytes each path reads at M=1 (GGUF bytes for
lut/mad, the int4 pack for int4pack, 4 bytes a weight for fp32), and the LUT's speed relative to
MAD (t_mad / t_lut: > 1 means the LUT is faster). Below it: the machine's streaming bandwidth (the
median of summing a 512 MB fp32 tensor), the LUT's per-call table build (activation quantisation +
tables, included in the lut times) and the repack cost. ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ditto.numerics.kernels import gguf_lut, gguf_reference

SHAPES = [  # (name, kind, N, K, tensor in the bundled file)
    ("q/o_proj", "Q4_1", 576, 576, "blk.0.attn_q.weight"),
    ("k/v_proj", "Q4_1", 192, 576, "blk.0.attn_k.weight"),
    ("gate/up", "Q4_1", 1536, 576, "blk.0.ffn_gate.weight"),
    ("down", "Q4_1", 576, 1536, "blk.0.ffn_down.weight"),
    ("lm_head", "Q8_0", 49152, 576, "token_embd.weight"),
]
PATHS = ["lut", "lut-packed", "mad", "int4pack", "fp32"]


def timed(fn: Callable[[], object], budget_s: float, min_reps: int = 5, max_reps: int = 2000) -> dict[str, float]:
    """Median and minimum seconds of fn() over repeats (after 2 warm-up calls)."""
    fn()
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random valid blocks: random bytes with the fp16 d (and m) set to small normal values."""
    per = gguf_reference.BLOCKS[kind][1]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, k // 32, per), generator=g, dtype=torch.uint8).numpy()
    nf = 2 if kind == "Q4_1" else 1
    raw[..., : 2 * nf] = (
        (torch.randn(n, k // 32, nf, generator=g) * 0.02).half().numpy().view(np.uint8).reshape(n, k // 32, 2 * nf)
    )
    return raw.reshape(n, -1)


def load_weights() -> tuple[dict[str, np.ndarray], str]:
    """Shape name -> uint8 (N, row_bytes), from the bundled GGUF when installed."""
    try:
        from ditto.loader.gguf_file import GGUFFile
        from ditto.loader.registry import bundled_path

        tensors = {t.name: t for t in GGUFFile(bundled_path("smollm2-135m-instruct")).tensors}
        out = {}
        for name, kind, n, k, tname in SHAPES:
            t = tensors[tname]
            assert t.type_name == kind and t.rows_cols == (n, k), (tname, t.type_name, t.rows_cols)
            out[name] = np.ascontiguousarray(t.data).reshape(n, -1).copy()
        return out, "bundled SmolLM2-135M-Instruct Q4_1 (blk.0.*, token_embd)"
    except Exception as e:  # noqa: BLE001 - any failure: fall back to random blocks
        return {name: random_blocks(kind, n, k) for name, kind, n, k, _ in SHAPES}, f"random blocks ({e})"


def int4pack_path(w_fp32: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], int] | None:
    """torch's CPU int4 kernel on w re-quantised (asymmetric, group 32), as W4Linear calls it; (fn, weight bytes)."""
    from torch import nn

    from ditto.numerics.quant import int4_cpu_kernel_available
    from ditto.numerics.w4 import W4Linear

    if not int4_cpu_kernel_available():
        return None
    n, k = w_fp32.shape
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w_fp32)
    mod = W4Linear(linear, 32, symmetric=False, backend="tinygemm")
    packed, sz, n_out = mod.packed, mod.scales_zeros, mod.out_features

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed, 32, sz)
        if y.shape[1] != n_out:
            y = y[:, :n_out]
        return y.float()

    return run, packed.numel() * packed.element_size() + sz.numel() * sz.element_size()


def table_build_us(x: torch.Tensor, budget_s: float) -> float:
    """Microseconds of the LUT's first step alone (activation quantisation + tables, in C), net of the
    call floor (the same C call on M = 0 rows: ctypes and the OpenMP region, which lut_linear pays once)."""
    lib = gguf_lut._lib()
    m, k = x.shape
    tab, dx, sx = gguf_lut.build_tables(x)  # buffers of the right size
    args = (x.data_ptr(), m, k, x.stride(0), tab.data_ptr(), dx.data_ptr(), sx.data_ptr())
    full = timed(lambda: lib.ditto_lut_tables(0, *args), budget_s)["median_s"]
    floor = timed(lambda: lib.ditto_lut_tables(0, args[0], 0, *args[2:]), budget_s)["median_s"]
    return max(full - floor, 0.0) * 1e6


def stream_bandwidth(budget_s: float) -> float:
    """GB/s of summing a 512 MB fp32 tensor (median of repeats)."""
    t = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    r = timed(lambda: t.sum(), budget_s, min_reps=5, max_reps=50)
    return t.numel() * 4 / r["median_s"] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 32], help="token counts M (default 1 32)")
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of timing per cell (default 0.4)")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    try:
        from ditto.numerics.kernels import gguf_blocks

        mad = gguf_blocks.block_linear if gguf_blocks.kernel_available() else None
        mad_note = "gguf_blocks.block_linear" if mad else f"gguf_blocks unavailable: {gguf_blocks.kernel_status()}"
    except ImportError as e:
        mad, mad_note = None, f"gguf_blocks not importable ({e}): MAD skipped"
    if not gguf_lut.kernel_available():
        raise SystemExit(f"gguf_lut kernel unavailable: {gguf_lut.kernel_status()}")
    lut_isa = "avx512" if gguf_lut.has_avx512() else "portable"
    weights, source = load_weights()

    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"weights: {source}; LUT isa: {lut_isa}; MAD: {mad_note}")
    print(f"median microseconds per call (budget {args.budget} s per cell)\n")

    results: list[dict] = []
    extras: dict[str, dict] = {}
    for name, kind, n, k, _ in SHAPES:
        raw = weights[name]
        wt = torch.from_numpy(raw)
        w_fp32 = torch.from_numpy(gguf_reference.dequantize(raw, kind, k))
        lut_ok = kind in gguf_lut.KINDS
        fns: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int] | None] = {}
        if lut_ok:
            t0 = time.perf_counter()
            packed = gguf_lut.repack(raw, kind)
            repack_s = time.perf_counter() - t0
            extras.setdefault(name, {})["repack_s"] = repack_s
            fns["lut"] = (lambda x, wt=wt, kind=kind: gguf_lut.lut_linear(x, wt, kind)), raw.nbytes
            fns["lut-packed"] = (lambda x, p=packed, kind=kind: gguf_lut.lut_linear(x, p, kind)), packed.data.numel()
            fns["int4pack"] = int4pack_path(w_fp32)
        fns["mad"] = ((lambda x, wt=wt, kind=kind: mad(x, wt, kind)), raw.nbytes) if mad else None
        fns["fp32"] = (lambda x, w=w_fp32: F.linear(x, w)), w_fp32.numel() * 4
        for m in args.ms:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            row = {"shape": name, "kind": kind, "N": n, "K": k, "M": m}
            for path in PATHS:
                entry = fns.get(path)
                if entry is None:
                    continue
                fn, nbytes = entry
                r = timed(lambda fn=fn, x=x: fn(x), args.budget)
                gb_s = nbytes / r["median_s"] / 1e9
                row[path] = {**r, "us": r["median_s"] * 1e6, "weight_bytes": nbytes, "GBps": gb_s}
            if lut_ok:
                row["lut_tables_us"] = table_build_us(x, args.budget / 2)
            results.append(row)

    def cell(row: dict, path: str) -> str:
        return f"{row[path]['us']:.1f}" if path in row else "-"

    def gbps(row: dict, path: str) -> str:
        return f"{row[path]['GBps']:.1f}" if path in row and row["M"] == 1 else "-"

    def ratio(row: dict, path: str) -> str:
        return f"{row['mad']['us'] / row[path]['us']:.2f}" if path in row and "mad" in row else "-"

    head = ["shape", "kind", "N x K", "M", *[f"{p} us" for p in PATHS], *[f"{p} GB/s" for p in PATHS]]
    head += ["LUT/MAD speed", "LUT-packed/MAD speed"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in results:
        cells = [row["shape"], row["kind"], f"{row['N']}x{row['K']}", str(row["M"])]
        cells += [cell(row, p) for p in PATHS] + [gbps(row, p) for p in PATHS]
        cells += [ratio(row, "lut"), ratio(row, "lut-packed")]
        print("| " + " | ".join(cells) + " |")

    bw = stream_bandwidth(max(args.budget, 1.0))
    print(f"\nstreaming bandwidth (sum over a 512 MB fp32 tensor, {args.threads} threads): {bw:.1f} GB/s")
    print("LUT table build per call (quantisation + tables in C, net of the call floor; part of the lut times):")
    for row in results:
        if "lut_tables_us" in row:
            share = row["lut_tables_us"] / row["lut"]["us"] * 100
            print(f"  {row['shape']:9s} M={row['M']:<3d} {row['lut_tables_us']:8.1f} us ({share:.0f}% of the lut call)")
    print("one-off repack to the bit-plane layout (lut-packed):")
    for name, e in extras.items():
        print(f"  {name:9s} {e['repack_s'] * 1e3:.2f} ms")

    if args.json:
        doc = {
            "threads": args.threads,
            "torch": torch.__version__,
            "weights": source,
            "lut_isa": lut_isa,
            "mad": mad_note,
            "stream_GBps": bw,
            "results": results,
            "repack_s": {k: v["repack_s"] for k, v in extras.items()},
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
