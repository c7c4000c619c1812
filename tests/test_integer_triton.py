"""The Triton kernel of the integer mode (int8 GEMM + linear epilogue), run on CPU tensors under
Triton's interpreter: bit for bit the torch ops and the C kernels, on tiny shapes, one linear and
fused parts; and a whole tiny model routed through it equal to the C path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from ditto.numerics.kernels import integer_elementwise_c as iew
from ditto.numerics.kernels import integer_ops as iops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
SHAPES = ((64, [64]), (40, [24]), (96, [48, 16, 16]), (130, [70, 9]))  # (K, output sizes of the parts)
CASES = [(m, k, sizes) for m in (1, 2, 5, 16, 17, 33) for k, sizes in SHAPES]
ROWS = [(1, 64, 10), (3, 1500, 31), (5, 37, 20), (2, 2048, 31), (4, 3000, 1)]  # (M, K, bits of |x|)
NORMS = [(2, 64, 10, 0), (3, 1500, 30, 2), (5, 576, 20, -3), (2, 2048, 31, 0), (2, 9, 3, -1)]  # (M, D, bits, shift)


class Part:
    """An IntLinear's epilogue constants (m, bias, shift, limit), as the kernel reads them."""

    def __init__(self, n: int, shift: int, limit: int, bias: bool, g: torch.Generator):
        self.m = torch.randint(1, 1 << 18, (n,), generator=g)
        self.bias = torch.randint(-(1 << 20), 1 << 20, (n,), generator=g) if bias else None
        self.shift, self.limit = shift, limit

    def epilogue(self, acc, a16, sa):  # IntLinear.epilogue, the torch reference
        y = acc.long().mul_(a16).mul_(self.m)
        sh = self.shift - sa
        y.add_((torch.ones_like(sh) << sh) >> 1).bitwise_right_shift_(sh)
        if self.bias is not None:
            y.add_(self.bias)
        return y.clamp_(-self.limit + 1, self.limit - 1)


def _case(m: int, k: int, sizes: list[int], seed: int, scale_bits: int = 28):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(1 << scale_bits), 1 << scale_bits, (m, k), generator=g)
    x[0, : k // 2] = 0  # a row with small values (sa = 0 on most of it)
    q, a16, sa = iops.quantize_rows(x)
    w8 = torch.randint(-127, 128, (sum(sizes), k), generator=g, dtype=torch.int8)
    limits = [(40 + i, 1 << 30) if i % 2 == 0 else (30, 1 << 24) for i in range(len(sizes))]  # (shift, limit)
    parts = [Part(n, *limits[i], bias=i != 1, g=g) for i, n in enumerate(sizes)]
    return q, a16, sa, w8, parts


# Triton's interpreter must be on when Triton is first imported (its own library functions are
# decorated then), so the kernel runs in a child process started with TRITON_INTERPRET=1; the
# parent builds the same inputs and compares.
_KERNEL_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_integer_triton import CASES, NORMS, ROWS, _case
from ditto.numerics.kernels import integer_triton as itr
out = {}
for m, k, sizes in CASES:
    q, a16, sa, w8, parts = _case(m, k, sizes, seed=m * 1000 + k)
    out[f"{m}/{k}/{sizes}"] = itr.gemm_epilogue(q, w8, a16, sa, itr.column_params(parts, q.device))
q, a16, sa, w8, parts = _case(37, 96, [48, 16, 16], seed=5)
cols = itr.column_params(parts, q.device)
out["batch"] = itr.gemm_epilogue(q, w8, a16, sa, cols)
out["alone"] = torch.cat([itr.gemm_epilogue(q[i : i + 1], w8, a16[i : i + 1], sa[i : i + 1], cols) for i in range(37)])
g = torch.Generator().manual_seed(8)
for m, k, bits in ROWS:
    x = torch.randint(-(1 << bits) + 1, 1 << bits, (m, k), generator=g, dtype=torch.int64)
    x[0] = 0
    out[f"rows/{m}/{k}/{bits}/int64"] = itr.quantize_rows(x)
    out[f"rows/{m}/{k}/{bits}/int32"] = itr.quantize_rows(x.to(torch.int32))
for m, d, bits, shift in NORMS:
    x = torch.randint(-(1 << bits) + 1, 1 << bits, (m, d), generator=g, dtype=torch.int64)
    x[0] = 0
    gm = torch.randint(-(1 << 23), 1 << 23, (d,), generator=g)
    out[f"norm/{m}/{d}/{bits}/{shift}"] = (x, gm, itr.rmsnorm(x.to(torch.int32), gm, 30, 12345, shift))
for name, bad in (("dtype", (q.long(), w8)), ("shape", (q[:, :32], w8))):
    try:
        itr.gemm_epilogue(*bad, a16, sa, cols)
        out[name] = "accepted"
    except ValueError as e:
        out[name] = str(e)
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton") / "out.pt"
    res = subprocess.run(
        [sys.executable, "-c", _KERNEL_CHILD, os.path.dirname(__file__), str(out)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("m,k,sizes", CASES)
def test_kernel_equals_torch_ops_and_c(m, k, sizes, kernel_results):
    q, a16, sa, w8, parts = _case(m, k, sizes, seed=m * 1000 + k)
    acc = iops.int8_matmul(q, w8)
    want = torch.cat([p.epilogue(a, a16, sa) for p, a in zip(parts, acc.split(sizes, dim=1))], dim=1)
    got = kernel_results[f"{m}/{k}/{sizes}"]
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    if iew.kernel_available():
        kp = iew.EpilogueParams.build([(p.m, p.bias, p.shift, p.limit) for p in parts])
        assert torch.equal(iew.linear_epilogue(acc, a16, sa, kp).long(), want)
    if len(sizes) > 1 and m >= 5:  # the 2^24-limited part saturates somewhere: the clamp is exercised
        assert bool((want[:, sizes[0] : sizes[0] + sizes[1]].abs() == (1 << 24) - 1).any())


@pytest.mark.parametrize("m,k,bits", ROWS)
def test_quantize_rows_kernel_is_integer_ops(m, k, bits, kernel_results):
    """Per-row int8 quantisation (a zero row, |x| up to 2^31 - 1, K across several 1024 chunks or not a
    power of two, int32 and int64 inputs): q, a16 and sa equal integer_ops.quantize_rows'."""
    g = torch.Generator().manual_seed(8)
    for mm, kk, bb in ROWS:  # the child drew the same numbers in this order
        x = torch.randint(-(1 << bb) + 1, 1 << bb, (mm, kk), generator=g, dtype=torch.int64)
        if (mm, kk, bb) == (m, k, bits):
            break
    x[0] = 0
    want = iops.quantize_rows(x)
    for kind in ("int64", "int32"):
        got = kernel_results[f"rows/{m}/{k}/{bits}/{kind}"]
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want)), kind


@pytest.mark.parametrize("m,d,bits,shift", NORMS)
def test_rmsnorm_kernel_is_integer_ops(m, d, bits, shift, kernel_results):
    """Integer RMSNorm (rmsnorm_int, then IntRMSNorm's left or rounding right output shift): a zero row,
    |x| up to 2^31 - 1, D over several chunks, odd D: the torch ops' bits."""
    x, gm, got = kernel_results[f"norm/{m}/{d}/{bits}/{shift}"]
    want = iops.rmsnorm_int(x, gm, 30, 12345)
    want = want << shift if shift >= 0 else iops.rshift_round(want, -shift)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)


def test_rows_do_not_depend_on_the_batch(kernel_results):
    """Every row alone equals the row inside the batch (tiles only decide who computes a sum)."""
    assert torch.equal(kernel_results["alone"], kernel_results["batch"])


def test_bad_operands_are_refused(kernel_results):
    assert "gemm_epilogue" in kernel_results["dtype"] and "gemm_epilogue" in kernel_results["shape"]


_MODEL_CHILD = """
import json, sys, torch
from ditto import LLM, SamplingParams
from ditto.numerics.kernels import integer_triton as itr
llm = LLM(sys.argv[1], numerics="integer", determinism="exact", progress=False, num_kv_blocks=64)
g = torch.Generator().manual_seed(2)
prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17)]
params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=4, max_tokens=4, ignore_eos=True)]
outs = llm.generate(prompts, params)
ints = llm.numerics.mode.logits_int(llm.score(prompts[0], [7, 8, 9], keep_logits=True).logits)
print(json.dumps({"applies": itr.applies(torch.zeros(1)), "tokens": [o.outputs[0].token_ids for o in outs],
                  "logprobs": [o.outputs[0].logprobs for o in outs], "ints": ints.tolist()}))
"""


def test_a_model_through_the_kernel_equals_the_c_path(tiny_dirs):
    """A tiny llama's every linear through the (interpreted) Triton kernel, attention and the rest on
    the accelerator's torch formulation: the tokens, logprobs and integer logits of the C path."""
    from ditto import LLM

    path = str(tiny_dirs["llama"])
    LLM(path, numerics="integer", determinism="exact", progress=False, num_kv_blocks=64)  # calibrated once
    runs = []
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DITTO_INT_TRITON")}
    for env in ({}, {"TRITON_INTERPRET": "1", "DITTO_INT_TRITON": "1", iops.ACCELERATOR_ENV: "1"}):
        res = subprocess.run(
            [sys.executable, "-c", _MODEL_CHILD, path], env={**base, **env}, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    c_path, kernel = runs
    assert (c_path.pop("applies"), kernel.pop("applies")) == (False, True)
    assert kernel == c_path
