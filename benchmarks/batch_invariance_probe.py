"""Probe which torch CPU ops are batch-invariant (row result independent of batch size M / position).

Usage: .venv/bin/python benchmarks/batch_invariance_probe.py [--quick]

For every op the reference for row i is the op applied to row i alone (M=1); a (M, position) pair
"differs" when torch.equal fails for that row inside the batch of M.  Results are printed as compact
tables: for each shape/dtype/thread count, the set of M at which some row differs and the positions.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
DTYPES = [torch.float32, torch.bfloat16]


def _ms(big: bool, quick: bool) -> list[int]:
    if quick:
        return [1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 300]
    if big:
        return sorted(set(list(range(1, 34)) + [47, 48, 63, 64, 65, 96, 127, 128, 129, 160, 192, 255, 256, 257, 300]))
    return list(range(1, 301))


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "-"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


def probe_rowwise(name: str, fn, X: torch.Tensor, ms: list[int]) -> tuple[list[int], dict[int, list[int]]]:
    """Return (list of M where some row differs from its M=1 result, {M: differing positions})."""
    alone = torch.cat([fn(X[i : i + 1]) for i in range(X.shape[0])])
    bad: list[int] = []
    pos: dict[int, list[int]] = {}
    for m in ms:
        y = fn(X[:m])
        diff = [i for i in range(m) if not torch.equal(y[i], alone[i])]
        if diff:
            bad.append(m)
            pos[m] = diff
    return bad, pos


def probe_linear(quick: bool) -> None:
    print("\n## F.linear(x[:M], W) row i vs F.linear(x[i:i+1], W)  (also torch.mm(x, W.t()))")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in DTYPES:
            for k, n in SHAPES:
                g = torch.Generator().manual_seed(0)
                X = torch.randn(300, k, generator=g).to(dtype)
                W = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
                Wt = W.t().contiguous()
                ms = _ms(n > 4096, quick)
                t0 = time.perf_counter()
                bad, pos = probe_rowwise("linear", lambda x, W=W: F.linear(x, W), X, ms)
                bad_mm, _ = probe_rowwise("mm", lambda x, Wt=Wt: torch.mm(x, Wt), X, ms)
                # is every row of a differing M wrong, or just some?
                allrows = [m for m in bad if len(pos[m]) == m]
                # do results at M>=2 agree among themselves (i.e. only M=1 is special)?
                ref2 = F.linear(X[:2], W)
                bigref = F.linear(X, W)
                same_2_vs_300 = torch.equal(ref2, bigref[:2])
                print(
                    f"t={threads} {str(dtype)[6:]:8s} K={k:5d} N={n:5d} | linear differs at M={_ranges(bad)}"
                    f" (all rows: {_ranges(allrows) if allrows != bad else 'yes'}) | mm differs at M="
                    f"{_ranges(bad_mm)} | rows(M=2)==rows(M=300)[:2]: {same_2_vs_300}"
                    f" [{time.perf_counter() - t0:.1f}s]"
                )
    torch.set_num_threads(2)


def probe_threads() -> None:
    print("\n## thread count: F.linear at fixed M, 1 vs 2 threads")
    for dtype in DTYPES:
        for k, n in SHAPES:
            g = torch.Generator().manual_seed(1)
            X = torch.randn(256, k, generator=g).to(dtype)
            W = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
            res = []
            for m in (1, 16, 64, 256):
                torch.set_num_threads(1)
                a = F.linear(X[:m], W)
                torch.set_num_threads(2)
                b = F.linear(X[:m], W)
                res.append(f"M={m}:{'same' if torch.equal(a, b) else 'DIFF'}")
            print(f"{str(dtype)[6:]:8s} K={k:5d} N={n:5d} | " + " ".join(res))


def probe_bmm() -> None:
    print("\n## torch.bmm with fixed per-matrix shape (G x D) @ (D x S): matrix b vs computed alone")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in DTYPES:
            for g_, d, s in [(1, 64, 16), (3, 64, 16), (4, 64, 32), (8, 128, 16), (1, 64, 64)]:
                gen = torch.Generator().manual_seed(2)
                A = torch.randn(300, g_, d, generator=gen).to(dtype)
                B = torch.randn(300, d, s, generator=gen).to(dtype)
                alone = torch.cat([torch.bmm(A[i : i + 1], B[i : i + 1]) for i in range(300)])
                bad = []
                for nb in range(1, 301):
                    y = torch.bmm(A[:nb], B[:nb])
                    if not torch.equal(y, alone[:nb]):
                        bad.append(nb)
                # P@V shape: (G x S) @ (S x D)
                P = torch.randn(300, g_, s, generator=gen).to(dtype)
                V = torch.randn(300, s, d, generator=gen).to(dtype)
                alone2 = torch.cat([torch.bmm(P[i : i + 1], V[i : i + 1]) for i in range(300)])
                bad2 = [nb for nb in range(1, 301) if not torch.equal(torch.bmm(P[:nb], V[:nb]), alone2[:nb])]
                print(
                    f"t={threads} {str(dtype)[6:]:8s} G={g_} D={d} S={s} | QK^T differs at batch="
                    f"{_ranges(bad)} | PV differs at batch={_ranges(bad2)}"
                )
    torch.set_num_threads(2)


def probe_reductions() -> None:
    print("\n## row reductions over last dim of (M, V): row i vs computed alone")
    ops = {
        "sum": lambda x: x.sum(-1),
        "sum(fp32 acc)": lambda x: x.sum(-1, dtype=torch.float32),
        "mean": lambda x: x.mean(-1),
        "pow2.mean (rmsnorm)": lambda x: x.float().pow(2).mean(-1, keepdim=True),
        "amax": lambda x: x.amax(-1),
        "argmax": lambda x: x.argmax(-1),
        "softmax": lambda x: torch.softmax(x, -1),
        "log_softmax": lambda x: torch.log_softmax(x, -1),
        "logsumexp": lambda x: torch.logsumexp(x, -1),
        "rms_norm": lambda x: F.rms_norm(x, (x.shape[-1],), eps=1e-6),
        "layer_norm": lambda x: F.layer_norm(x, (x.shape[-1],)),
    }
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in DTYPES:
            for v in (576, 1536, 49152):
                gen = torch.Generator().manual_seed(3)
                X = (torch.randn(300, v, generator=gen) * 3).to(dtype)
                ms = _ms(v > 4096, False) if v <= 4096 else _ms(True, False)
                res = []
                for name, fn in ops.items():
                    bad, _ = probe_rowwise(name, fn, X, ms)
                    res.append(f"{name}:{'ok' if not bad else 'M=' + _ranges(bad)}")
                print(f"t={threads} {str(dtype)[6:]:8s} V={v:5d} | " + " ".join(res))
    torch.set_num_threads(2)


def probe_segment_sums() -> None:
    print("\n## segment sums: index_add_ / scatter_add_ / index_reduce over blocks -> per-sequence rows")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in DTYPES:
            gen = torch.Generator().manual_seed(4)
            # 200 sequences with 1..9 blocks each; each block contributes (H, D)
            nblk = torch.randint(1, 10, (200,), generator=gen)
            seg = torch.repeat_interleave(torch.arange(200), nblk)
            vals = torch.randn(len(seg), 8, 64, generator=gen).to(dtype)
            starts = torch.cumsum(nblk, 0) - nblk

            def alone(s: int, vals=vals, starts=starts, nblk=nblk) -> torch.Tensor:
                out = torch.zeros(1, 8, 64, dtype=vals.dtype)
                v = vals[starts[s] : starts[s] + nblk[s]]
                return out.index_add_(0, torch.zeros(len(v), dtype=torch.long), v)[0]

            def alone_sa(s: int, vals=vals, starts=starts, nblk=nblk) -> torch.Tensor:
                v = vals[starts[s] : starts[s] + nblk[s]]
                idx = torch.zeros(len(v), 8, 64, dtype=torch.long)
                return torch.zeros(1, 8, 64, dtype=vals.dtype).scatter_add_(0, idx, v)[0]

            bad_ia, bad_sa = [], []
            for nseq in list(range(1, 40)) + [64, 100, 150, 200]:
                n = int(nblk[:nseq].sum())
                full = torch.zeros(nseq, 8, 64, dtype=dtype).index_add_(0, seg[:n], vals[:n])
                idx = seg[:n].view(-1, 1, 1).expand(n, 8, 64)
                full_sa = torch.zeros(nseq, 8, 64, dtype=dtype).scatter_add_(0, idx, vals[:n])
                for s in range(nseq):
                    if not torch.equal(full[s], alone(s)):
                        bad_ia.append(nseq)
                        break
                for s in range(nseq):
                    if not torch.equal(full_sa[s], alone_sa(s)):
                        bad_sa.append(nseq)
                        break
            print(
                f"t={threads} {str(dtype)[6:]:8s} | index_add_ differs at nseq={_ranges(bad_ia)}"
                f" | scatter_add_ differs at nseq={_ranges(bad_sa)}"
            )
    torch.set_num_threads(2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer M values")
    ap.add_argument("--only", default="linear,threads,bmm,reductions,segments")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, {torch.backends.cpu.get_cpu_capability()}")
    only = set(args.only.split(","))
    if "linear" in only:
        probe_linear(args.quick)
    if "threads" in only:
        probe_threads()
    if "bmm" in only:
        probe_bmm()
    if "reductions" in only:
        probe_reductions()
    if "segments" in only:
        probe_segment_sums()


if __name__ == "__main__":
    main()
