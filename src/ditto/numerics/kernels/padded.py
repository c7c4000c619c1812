"""Batch-invariant linear layers by fixed-regime GEMMs.

On this class of CPU, torch's fp32 (MKL) and bf16 (oneDNN) GEMMs pick their summation order from
the number of rows M only while M is small (M = 1, 2-3, 4-11 behave differently); from 16 rows on,
a row's bits no longer depend on M, its position or its neighbours (measured for every SmolLM2 /
Gemma shape, 1 and 2 threads, M up to 2048: benchmarks/batch_invariance_probe.py). So padding the
rows of every call up to 16 puts every call in the same regime at almost no cost for batches, and a
16-row GEMM instead of a GEMV for single-sequence decode.

Each wrapped layer checks the claim for its own shape once (rows alone vs inside batches of several
sizes and positions) and falls back to the sequential-FMA C kernel of `batch_invariant.py` when the
check fails, so the promise holds on CPUs whose BLAS behaves differently. A check runs 13 GEMMs of up
to 308 rows (the LM head's among them: seconds on a small CPU), so its verdict is kept on disk
beside the kernels (`invariance.json` in the kernel cache), keyed by everything it depends on: the
layer's class and the mtime of its source, its shape, the dtype, the thread count, torch's version
and build, and the CPU's flags. A new process with the same key trusts the recorded verdict.

fp32 and bf16 nn.Linear layers skip all of that where their C kernels build: fp32 runs on the
sequential-FMA kernel, bf16 on the fixed-order bf16 kernel (bf16_linear.py), both invariant by
construction with no padding and no check.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os

import torch
from torch import nn

MIN_ROWS = 16
_CHECK_SIZES = (16, 17, 33, 64, 255, 300)
# bf16 nn.Linear (oneDNN) keeps one regime from 2 rows on here (benchmarks/batch_invariance_probe.py):
# a lone row is padded to 2, not 16, where the shape's check passes. Unpadded single rows passed the
# same per-shape check yet changed the engine's bits (0 of 8 prompts alone = in a batch): not used
BF16_MIN_ROWS = 2
_SMALL_CHECK_SIZES = (1, 2, 3, 4, 5, 7, 8, 11, 12, 15, 16, 17, 33, 64, 255, 300)
_CHECK_VERSION = 2  # bump when the check below changes: verdicts recorded on disk by another check are not reused
_verdicts: dict[tuple, bool] = {}


def _pad_rows(x: torch.Tensor, min_rows: int = MIN_ROWS) -> tuple[torch.Tensor, int]:
    m = x.shape[0]
    if m >= min_rows:
        return x, m
    return torch.cat([x, x.new_zeros(min_rows - m, *x.shape[1:])]), m


class RowsWrapper(nn.Module):
    """A module around a row-wise module (..., K) -> (..., N) that changes only how rows reach it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def weight(self):  # tied-weight bookkeeping and introspection still work
        return self.inner.weight


class PaddedLinear(RowsWrapper):
    """Wraps any linear-like module (fp32, bf16, layercast, quantised) and pads its rows to
    `min_rows` (16; 2 for a bf16 nn.Linear whose regime check passes from 2 rows)."""

    def __init__(self, inner: nn.Module, min_rows: int = MIN_ROWS):
        super().__init__(inner)
        self.min_rows = min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        padded, m = _pad_rows(x2, self.min_rows)
        y = self.inner(padded)[:m]
        return y.reshape(*lead, y.shape[-1])


def _in_features(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) or (w is not None and w.dim() == 2 and w.is_floating_point()):
        return module.weight.shape[1]
    return int(module.in_features)


def _disk_key(module: nn.Module, key: tuple) -> str:
    """The verdict's key across processes: `key` plus the layer's source, torch's build, the CPU and
    the version of the check itself."""
    from ditto.numerics.kernels.cbuild import cpu_flags

    try:
        src = inspect.getsourcefile(type(module)) or ""
        stamp = f"{src}@{os.stat(src).st_mtime_ns}" if src else ""
    except (OSError, TypeError):
        stamp = "?"
    build = hashlib.sha256((torch.__version__ + torch.__config__.show() + cpu_flags()).encode()).hexdigest()[:16]
    return "|".join(map(str, (*key, type(module).__module__, stamp, build, f"check{_CHECK_VERSION}")))


def _verdict_file():
    from ditto.numerics.kernels.cbuild import kernel_cache_dir

    return kernel_cache_dir() / "invariance.json"


def _read_verdicts() -> dict[str, bool]:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return {k: v for k, v in dict(json.loads(_verdict_file().read_text())).items() if isinstance(v, bool)}
    return {}


def _record_verdict(disk_key: str, ok: bool) -> None:
    path = _verdict_file()
    with contextlib.suppress(OSError):
        known = _read_verdicts() | {disk_key: ok}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, path)  # atomic: concurrent processes read the old or the new file


def regime_is_invariant(module: nn.Module, dtype: torch.dtype, min_rows: int = MIN_ROWS) -> bool:
    """Do rows of `module` computed in padded batches of several sizes and positions agree bitwise?
    Checked once per layer kind, shape, dtype, thread count, torch build and CPU (the verdict is kept on disk)."""
    k = _in_features(module)
    key = (type(module).__name__, k, getattr(module, "out_features", None), dtype, torch.get_num_threads(), min_rows)
    if key in _verdicts:
        return _verdicts[key]
    disk_key = _disk_key(module, key)
    recorded = _read_verdicts().get(disk_key)
    if recorded is not None:
        _verdicts[key] = recorded
        return recorded
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max(_CHECK_SIZES) + 8, k, generator=gen).to(dtype)
    with torch.inference_mode():
        if min_rows == MIN_ROWS:
            ref = module(_pad_rows(x[:3])[0])[:3]
            ok = True
            for m in _CHECK_SIZES:
                for offset in (0, 5):
                    rows = torch.cat([x[m : m + offset], x[:3], x[3 + offset : m]]) if offset else x[:m]
                    out = module(_pad_rows(rows)[0])
                    ok &= torch.equal(out[offset : offset + 3], ref)
        else:  # one row alone (padded to min_rows) against the same row at every place of small
            # batches (a GEMM's tail rows may take another micro-kernel) and three places of large ones
            ref = module(_pad_rows(x[:1], min_rows)[0])[:1]
            ok = True
            for m in _SMALL_CHECK_SIZES:
                for pos in range(m) if m <= 17 else (0, m // 2, m - 1):
                    rows = torch.cat([x[1:m][:pos], x[:1], x[1:m][pos:]])  # (m, K), x[0] at row pos
                    out = module(_pad_rows(rows, min_rows)[0])
                    ok &= torch.equal(out[pos : pos + 1], ref)
    _verdicts[key] = bool(ok)
    _record_verdict(disk_key, _verdicts[key])
    return _verdicts[key]


LINEAR_NAMES = (
    "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj", "lm_head",
)  # fmt: skip


def _c_kernel_first(module: nn.Module, act_dtype: torch.dtype) -> bool:
    """fp32 linears go straight to the fixed-order C kernel when it is built: it is invariant by
    construction and, on the CPUs measured, faster than MKL at every row count (M = 1: a GEMV
    instead of a 16-row padded GEMM, 4-7x; M = 32 to 2048: 1.1-1.6x), so padding buys nothing."""
    from ditto.numerics.kernels.batch_invariant import kernel_available

    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        and act_dtype == torch.float32
        and weight is not None
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and kernel_available()
    )


def _bf16_c_kernel(module: nn.Module, act_dtype: torch.dtype) -> bool:
    """bf16 linears go to the fixed-order bf16 kernel (kernels/bf16_linear.py: vdpbf16ps's steps,
    fp32 accumulation) when it is built: invariant by construction at every M with no padding and no
    run-time check, and faster than oneDNN's padded GEMM at M = 1 (half the bytes of the fp32 chain)."""
    from ditto.numerics.kernels.batch_invariant import uses_bf16_kernel

    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        and act_dtype == torch.bfloat16
        and weight is not None
        and weight.device.type == "cpu"
        and uses_bf16_kernel(act_dtype, weight.dtype)
    )


def _bf16_linear(module: nn.Module, act_dtype: torch.dtype) -> bool:
    weight = getattr(module, "weight", None)
    bf16 = act_dtype == torch.bfloat16
    return type(module) is nn.Linear and bf16 and weight is not None and weight.dtype == act_dtype


def fuse_on_c_kernels(linears: list[nn.Module], act_dtype: torch.dtype) -> nn.Linear | None:
    """One nn.Linear whose output is the given ones' side by side (weights concatenated along N), when
    all of them will run on a fixed-order C kernel (fp32 or bf16): those compute every output element
    as its own chain over K, so fusing changes no bit and saves a dispatch per projection (single
    stream: 120 linear calls a token instead of 210 on SmolLM2). None leaves the group alone."""
    if not linears or not all(
        type(m) is nn.Linear and (_c_kernel_first(m, act_dtype) or _bf16_c_kernel(m, act_dtype)) for m in linears
    ):
        return None
    first = linears[0]
    if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype for m in linears):
        return None
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    # built on meta (no random init of a weight about to be replaced), then given the concatenation
    fused = nn.Linear(
        first.in_features, sum(m.out_features for m in linears), bias=biases[0] is not None, device="meta"
    )
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    if biases[0] is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused


def make_invariant(model: nn.Module, act_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap every projection and the LM head so that each row's result is independent of the batch
    (q/k/v and gate/up first fused into one linear each where they run on a C kernel)."""
    from ditto.models.decoder import Decoder, fuse_projections
    from ditto.numerics.kernels.batch_invariant import InvariantLinear

    if isinstance(model, Decoder):
        fuse_projections(model, lambda group: fuse_on_c_kernels(group, act_dtype))
    # names, not modules: a replaced linear is freed as soon as it is swapped (peak memory stays one layer up)
    names = [name for name, _ in model.named_modules() if name.split(".")[-1] in LINEAR_NAMES]
    for name in names:
        mod = model.get_submodule(name)
        if getattr(mod, "batch_invariant_kernel", False):
            continue  # a kernel whose rows never depend on the batch (e.g. layercast on the C kernel)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        attr = name.split(".")[-1]
        if _c_kernel_first(mod, act_dtype) or _bf16_c_kernel(mod, act_dtype):
            inv = InvariantLinear.from_linear(mod, compute_dtype=act_dtype)
            inv.release_unpacked()  # the packed copy replaces the weight: no model held twice
            setattr(parent, attr, inv)
            del mod, inv
        elif _bf16_linear(mod, act_dtype) and regime_is_invariant(mod, act_dtype, BF16_MIN_ROWS):
            setattr(parent, attr, PaddedLinear(mod, BF16_MIN_ROWS))
        elif regime_is_invariant(mod, act_dtype):
            setattr(parent, attr, PaddedLinear(mod))
        elif isinstance(mod, nn.Linear):
            setattr(parent, attr, InvariantLinear.from_linear(mod))
        else:
            raise ValueError(
                f"{name} ({type(mod).__name__}) is not batch-invariant on this CPU and has no invariant "
                "kernel; use numerics fp32, bf16, layercast, w8a8, w4 or mxint8 with batch_invariant"
            )
    return model
