"""The `integer` numerics mode (determinism level `exact`): a module swap to integer-only layers.

`IntegerMode(stats).apply(model)` replaces, in place, every float module of a `Decoder` by an
integer twin; the model file is unchanged and its forward runs on int32 tensors end to end.
`stats` come from `ditto.numerics.calibration.collect_stats` (a short calibration text, run
once, saved next to the model so the model digest covers it).

How each layer maps (s = real value of one integer unit; "Q.F" means s = 2^-F):
  Embedding        -> IntEmbedding  int8 table (per-row scale) -> residual int32 Q.R via a per-row
                      dyadic (embed_scale folded in). R = 24 - ceil(log2 max|resid|): 128x headroom.
  input_norm /     -> IntRMSNorm    rmsnorm_int: residual Q.R -> Q.Fn (Fn from max gain so |y| < 2^22),
  pre_ffn_norm                      gain divided by the SmoothQuant factors of the next GEMMs.
  q/k/v/gate/up    -> IntLinear     per-token int8 (quantize_rows) x int8 per-channel weight (columns
                      multiplied by the smoothing factors), int32 accumulation, per-channel dyadic
                      epilogue to Q.F (F = 20 - ceil(log2 max|out|)); v goes straight to int8 with
                      a static per-channel scale (the V cache format).
  q_norm / k_norm  -> IntRMSNorm    per head.
  rotary           -> rope_int      Q1.14 tables stored in the calibration.
  attention math   -> IntAttention  K cache int8 + per-(token, head) scale (a16, sa), V cache int8;
                      scores Q16 -> softmax_int (Q20 probabilities) -> P.V exact (7-bit limbs) ->
                      per-channel dyadic to Q.Fo -> o_proj IntLinear -> residual Q.R.
  act(gate) * up   -> IntMLP        silu_int / gelu_tanh_int on Q.Fg, product requantised to Q.Fh
                      (up rows divided, down columns multiplied by smoothing factors), down_proj.
  post norms       -> IntRMSNorm    (Gemma sandwich) output shifted to the residual Q.R.
  norm             -> IntRMSNorm    final hidden state Q.Ff (int32).
  lm_head          -> IntLMHead     logits int in Q.Fl with |logit| < 2^24, returned as float32
                      logit_int * 2^-Fl (exact), so compute_logits' .float() is exact and
                      `logits * 2^Fl` gives back the integers the sampler uses.
Residual adds stay in the model file (`x + h` on int32): every module output and every norm
input is checked below 2^30, so the add cannot wrap.

Setup derives integers from the float weights and the stored stats with correctly rounded IEEE
operations only (mul, div, sqrt, round, frexp), so every machine derives the same integers.

The attention context must offer `int_attention_batches(layer, k8, ka16, ksa, v8)`: store the new
keys/values, then list batches (q_idx (B, n) token indices, (k8, ka16, ksa, v8) of the keys, each
(B, L, Hkv, .), key_pos (B, L), q_pos (B, n)); keys with key_pos > q_pos (or outside the sliding
window) are masked to exact zeros, so a batch may be padded. `DenseIntContext` (contiguous, for tests and scoring) and
`IntegerPagedAttention` (the engine's block tables) implement it.

A context may also offer `int_attention_paged(layer, k8, ka16, ksa, v8)`: store the new keys/values,
then list (tokens (n,), positions (n,), cache (k8, ka16 int32, ksa int8, v8), each (blocks, bs, Hkv, .),
table (R, nb) block ids, table_row (n,)). With it, and when the fused C kernel builds
(kernels/integer_attention_c.py; DITTO_INT_DISABLE_KERNEL=1 turns it off), IntAttention reads the
keys in place through the block table instead of gathering them; the torch path stays the
reference and the fallback, and both give the same bits (tests/test_integer_attention_kernel.py).

The elementwise chains around the GEMMs run as fused C kernels too (kernels/integer_elementwise_c.py:
quantize_rows, the linear epilogues, IntMLP's activation / product / down_proj quantisation,
IntRMSNorm, the q/k norm + RoPE + quantisation of IntAttention, the P.V requantisation), bit-exact
with the torch ops, which stay the reference and the fallback (tests/test_integer_elementwise_kernel.py).
They are off with DITTO_INT_DISABLE_ELEMENTWISE=1 or DITTO_INT_DISABLE_KERNEL=1, and while the
integer_ops bound checks are on (kernel_checks / DITTO_INT_CHECKS=1: the checked torch ops run).

Engine steps (an IntegerPagedAttention context) run the same kernels through `integer_lean.LeanIntDecoder`:
4 GEMMs and 6 C calls per layer instead of the modules' dispatch chain, the same bits
(tests/test_integer_lean.py); the modules stay the reference and serve every other context.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ditto.numerics.kernels import integer_attention_c as iattn
from ditto.numerics.kernels import integer_elementwise_c as iew
from ditto.numerics.kernels import integer_ops as iops
from ditto.numerics.kernels import integer_triton as itr

RESID_TOP, INTER_TOP, LOGIT_TOP, NORM_TOP = 24, 20, 20, 22
SCORE_FRAC, PROB_BITS = 16, 20
LIMIT = 1 << 30


def frac_for(amax: float, top: int, hi: int = 40) -> int:
    """F such that amax * 2^F < 2^top (power-of-two format), clamped to [-8, hi]."""
    amax = float(amax)
    return hi if amax <= 0 else max(-8, min(hi, top - math.frexp(amax)[1]))


def quant_weight(w: torch.Tensor, col_scale=None, row_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (w8 (N, K), s_w (N,) float64) with w' ~= w8 * s_w.

    w' = w * col_scale[None, :] / row_scale[:, None] in float32 (elementwise IEEE ops, correctly
    rounded: every machine derives the same integers); s_w = max|w'_n| / 127 rounded to float32.
    """
    fast = iew.quant_weight(w, col_scale, row_scale)  # the same float32 ops in C (tests: bit for bit)
    if fast is not None:
        return fast[0], fast[1].double()
    w = w.detach().float()
    if col_scale is not None:
        w = w * col_scale.float()[None, :]
    if row_scale is not None:
        w = w / row_scale.float()[:, None]
    lo, hi = torch.aminmax(w, dim=1)
    s = torch.maximum(-lo, hi) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    w8 = torch.round(w / s[:, None]).to(torch.int8)  # |w / s| <= 127 (+ one rounding): in range
    return w8, s.double()


def _col_absmax(w: torch.Tensor) -> torch.Tensor:
    fast = iew.col_absmax(w)
    if fast is not None and bool(torch.isfinite(fast).all()):
        return fast.double()
    lo, hi = torch.aminmax(w.detach().float(), dim=0)
    return torch.maximum(-lo, hi).double()


def smooth_factors(act_max: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """SmoothQuant with alpha = 0.5: s_c = sqrt(max|x_c| / max|W[:, c]|) (sqrt is correctly rounded)."""
    w_max = torch.stack([_col_absmax(w) for w in weights]).amax(0)
    a = act_max.double()
    s = torch.sqrt(a / w_max)
    ok = (a > 0) & (w_max > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-4, 1e4)


def _dyadic_vec(scales: torch.Tensor, mbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return iops.dyadic_tensor(scales, mbits)


def _use_elementwise(x: torch.Tensor) -> bool:
    """Whether the fused elementwise C kernels run: on CPU, with the library built and the bound checks off."""
    return not iops.accelerator_path(x) and not iops._CHECKS and iew.kernel_available()


def _kernel_params(build, *args):
    """The kernel parameters from `build(*args)`, or None (torch path only) when they are out of the kernels' range."""
    try:
        return build(*args)
    except ValueError:
        return None


def _check_limit(x: torch.Tensor, what: str) -> None:
    if iops._CHECKS and x.numel() and int(x.abs().max()) >= LIMIT:
        raise OverflowError(f"{what}: |value| >= 2^30 (outside the calibrated range); recalibrate")


class IntEmbedding(nn.Module):
    def __init__(self, w8: torch.Tensor, s_w: torch.Tensor, embed_scale: float, resid_frac: int):
        super().__init__()
        self.w8 = w8
        self.m, self.e = _dyadic_vec(s_w * embed_scale * 2.0**resid_frac, 24)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = iops.requantise(self.w8[ids].long(), self.m[ids, None], self.e[ids, None])  # (T, D)
        _check_limit(x, "embedding")
        return x.to(torch.int32)


class IntRMSNorm(nn.Module):
    """rmsnorm_int from Q.in_frac to Q.out_frac; gain = (offset + weight) / smooth."""

    def __init__(self, norm, in_frac: int, out_frac: int | None = None, smooth: torch.Tensor | None = None):
        super().__init__()
        gain = norm.offset + norm.weight.detach().double()
        if smooth is not None:
            gain = gain / smooth
        dim = gain.numel()
        natural = frac_for(math.sqrt(dim) * float(gain.abs().max()), NORM_TOP)
        self.out_frac = natural if out_frac is None else out_frac
        self.gm, self.ge = iops.rmsnorm_params(gain, natural)
        self.shift = self.out_frac - natural  # > 0: exact left shift, < 0: rounding right shift
        self.eps_int = max(0, round(norm.eps * 2.0 ** (2 * in_frac)))
        self.kparams = _kernel_params(iew.NormParams.build, self.gm, self.ge, self.eps_int, self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kparams is not None and x.dtype == torch.int32 and _use_elementwise(x):
            return iew.rmsnorm(x, self.kparams)
        if x.dim() == 2 and itr.applies(x) and not iops._CHECKS:  # GPU: one Triton kernel, the same bits
            return itr.rmsnorm(x, self.gm, self.ge, self.eps_int, self.shift)
        _check_limit(x, "RMSNorm input")
        y = iops.rmsnorm_int(x, self.gm, self.ge, self.eps_int)
        y = y << self.shift if self.shift >= 0 else iops.rshift_round(y, -self.shift)
        _check_limit(y, "RMSNorm output")
        return y.to(torch.int32)


class IntLinear(nn.Module):
    """W8A8 with per-token dynamic activation scales: Q.in_frac -> out units s_out (per channel).

    Epilogue: out = (acc * a16 * m_n + 2^(sh-1)) >> sh with sh = shift - sa (one shift per token row,
    shared by all channels; m_n = round(scale_n * 2^shift) < 2^18, so channels 2^k below the largest
    scale keep 18 - k bits). Everything stays below 2^62: |acc| <= K * 127^2, a16 <= 2^15 + 1.
    """

    MBITS = 18

    def __init__(self, weight, bias, in_frac: int, s_out, col_scale=None, row_scale=None, limit: int = LIMIT):
        super().__init__()
        self.w8, s_w = quant_weight(weight, col_scale, row_scale)
        n, k = self.w8.shape
        s_out = torch.as_tensor(s_out, dtype=torch.float64).expand(n)
        scale = 2.0**-in_frac * s_w / (127 * s_out)
        shift = self.MBITS - math.frexp(float(scale.max()))[1]
        self.shift = min(62, shift)
        if self.shift < 17:
            raise ValueError(f"integer linear: output scale too coarse (shift {self.shift} < 17); recalibrate")
        self.m = torch.round(scale * 2.0**self.shift).long()  # power-of-two multiply + round: exact
        if k * 127**2 * ((1 << 15) + 1) * int(self.m.max()) >= 1 << 62:
            raise ValueError(f"integer linear: K={k} too large for the int64 epilogue")
        b = None
        if bias is not None:
            b = bias.detach().double() / (row_scale if row_scale is not None else 1.0)
            b = torch.round(b / s_out).long()
        self.bias = b
        self.limit = limit
        self.kparams = _kernel_params(iew.EpilogueParams.build, [(self.m, b, self.shift, limit)])

    def epilogue(self, acc: torch.Tensor, a16: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
        """int32 acc (T, N) of one token block -> int64 outputs in s_out units, clamped to the limit."""
        y = acc.long().mul_(a16).mul_(self.m)
        sh = self.shift - sa  # (T, 1), in [0, 62]
        y.add_((torch.ones_like(sh) << sh) >> 1).bitwise_right_shift_(sh)
        if self.bias is not None:
            y.add_(self.bias)
        return y.clamp_(-self.limit + 1, self.limit - 1)

    def forward_int(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if itr.applies(x):  # GPU: two Triton kernels (quantise; GEMM + epilogue), the same bits
            q, a16, sa = itr.quantize_rows(x.reshape(-1, shape[-1]))
            y = itr.gemm_epilogue(q, self.w8, a16, sa, _columns(self, [self], q.device)).long()
        else:
            q, a16, sa = iops.quantize_rows(x.reshape(-1, shape[-1]))
            y = self.epilogue(iops.int8_matmul(q, self.w8), a16, sa)
        return y.reshape(*shape[:-1], -1)

    def from_quantized(self, q: torch.Tensor, a16: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
        """Kernel path: GEMM + fused epilogue of quantize_rows output (T, K) -> int32 (T, N)."""
        return iew.linear_epilogue(iops.int8_matmul(q, self.w8), a16, sa, self.kparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kparams is not None and _use_elementwise(x):
            shape = x.shape
            y = self.from_quantized(*iew.quantize_rows(x.reshape(-1, shape[-1])))  # (T, N)
            return y.reshape(*shape[:-1], -1)
        return self.forward_int(x).to(torch.int32)


_TABLES32: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _int32_table(t: torch.Tensor) -> torch.Tensor:
    """`t` widened to contiguous int32, made once per source tensor (every layer shares it)."""
    hit = _TABLES32.get(id(t))
    if hit is None or hit[0] is not t:
        hit = _TABLES32[id(t)] = (t, t.to(torch.int32).contiguous())  # keeps t alive: ids stay unique
    return hit[1]


def _columns(owner: nn.Module, parts: list, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The Triton kernel's per-column parameters of `parts`, made once per owner and device."""
    cached = owner.__dict__.get("_triton_columns")
    if cached is None or cached[0].device != device:
        cached = itr.column_params(parts, device)
        owner.__dict__["_triton_columns"] = cached
    return cached


class FusedIntLinear(nn.Module):
    """Several IntLinear sharing one input: one quantize_rows and one int8 GEMM, per-part epilogues.
    The parts' weights become views of the fused one (stored once)."""

    def __init__(self, parts: list[IntLinear]):
        super().__init__()
        self.parts = parts
        self.w8 = torch.cat([p.w8 for p in parts])
        self.sizes = [p.w8.shape[0] for p in parts]
        for p, w in zip(parts, self.w8.split(self.sizes)):
            p.w8 = w  # (size, K) rows of the fused weight: a contiguous view
        ok = all(p.kparams is not None for p in parts)
        parts_args = [(p.m, p.bias, p.shift, p.limit) for p in parts]
        self.kparams = _kernel_params(iew.EpilogueParams.build, parts_args) if ok else None

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel path (needs kparams): the parts' outputs side by side, int32 (T, sum of sizes)."""
        q, a16, sa = iew.quantize_rows(x.reshape(-1, x.shape[-1]))  # (T, K)
        return iew.linear_epilogue(iops.int8_matmul(q, self.w8), a16, sa, self.kparams)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if itr.applies(x):  # GPU: quantise, then one GEMM + epilogue kernel for the parts side by side
            q, a16, sa = itr.quantize_rows(x.reshape(-1, x.shape[-1]))
            y = itr.gemm_epilogue(q, self.w8, a16, sa, _columns(self, self.parts, q.device)).long()
            return list(y.split(self.sizes, dim=1))
        q, a16, sa = iops.quantize_rows(x.reshape(-1, x.shape[-1]))
        acc = iops.int8_matmul(q, self.w8)
        return [p.epilogue(a, a16, sa) for p, a in zip(self.parts, acc.split(self.sizes, dim=1))]


class IntLMHead(IntLinear):
    """Logits int in Q.frac (|logit| < 2^24), returned as exact float32 logit_int * 2^-frac."""

    def __init__(self, weight, in_frac: int, frac: int):
        super().__init__(weight, None, in_frac, 2.0**-frac, limit=1 << 24)
        self.frac = frac
        self.row_sums: torch.Tensor | None = None  # for the one-row GEMV, made at its first call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kparams is not None and _use_elementwise(x):
            shape = x.shape
            q, a16, sa = iew.quantize_rows(x.reshape(-1, shape[-1]))  # (T, K)
            if q.shape[0] == 1:  # one row (single-stream decode): the C GEMV streams the (V, K) weight once
                if self.row_sums is None:
                    self.row_sums = iew.row_sums(self.w8)
                acc = iew.gemv(q, self.w8, self.row_sums)
            else:
                acc = iops.int8_matmul(q, self.w8)
            y = iew.linear_epilogue(acc, a16, sa, self.kparams, 2.0**-self.frac)
            return y.reshape(*shape[:-1], -1)
        return self.forward_int(x).float() * 2.0**-self.frac


class IntMLP(nn.Module):
    def __init__(self, mlp, stats, i: int, in_frac: int, resid_frac: int, activation: str, smooth_in):
        super().__init__()
        s_h = smooth_factors(stats[f"L{i}.h"], [mlp.down_proj.weight])  # h_c / s_c into down_proj
        self.fg = min(24, frac_for(stats[f"L{i}.gate"].max(), INTER_TOP))
        self.fu = frac_for((stats[f"L{i}.up"] / s_h).max(), INTER_TOP)
        self.fh = frac_for((stats[f"L{i}.h"] / s_h).max(), INTER_TOP)
        self.gate_proj = IntLinear(mlp.gate_proj.weight, None, in_frac, 2.0**-self.fg, col_scale=smooth_in)
        self.up_proj = IntLinear(mlp.up_proj.weight, None, in_frac, 2.0**-self.fu, smooth_in, row_scale=s_h)
        self.down_proj = IntLinear(mlp.down_proj.weight, None, self.fh, 2.0**-resid_frac, col_scale=s_h)
        self.act = iops.silu_int if activation == "silu" else iops.gelu_tanh_int
        self.gate_up = FusedIntLinear([self.gate_proj, self.up_proj])
        self.kparams = None
        if self.gate_up.kparams is not None and self.down_proj.kparams is not None:
            shift = self.fg + self.fu - self.fh
            gelu = activation != "silu"
            self.kparams = _kernel_params(iew.MLPParams.build, self.gate_up.kparams, gelu, self.fg, shift, LIMIT - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kparams is not None and _use_elementwise(x):
            shape = x.shape
            q, a16, sa = iew.quantize_rows(x.reshape(-1, shape[-1]))  # (T, hidden)
            h8, ha16, hsa = iew.mlp_act_quantize(iops.int8_matmul(q, self.gate_up.w8), a16, sa, self.kparams)
            return self.down_proj.from_quantized(h8, ha16, hsa).reshape(*shape[:-1], -1)
        gate, up = self.gate_up(x)
        g = self.act(gate, self.fg)  # Q.fg
        prod = g.mul_(up)  # Q.(fg + fu), |.| < 2^62
        shift = self.fg + self.fu - self.fh
        h = iops.rshift_round(prod, shift) if shift >= 0 else prod << -shift
        return self.down_proj(h.clamp_(-LIMIT + 1, LIMIT - 1))


def _use_kernel() -> bool:
    """Whether attention runs the fused C kernel (bit-exact with the torch path; off: DITTO_INT_DISABLE_KERNEL=1)."""
    return iattn.kernel_available()


def _group_heads(z: torch.Tensor, b: int, n: int, kv: int, g: int) -> torch.Tensor:
    """(b*n, H, c) -> (b, Hkv, n*G, c): the query rows of one kv group together (row = token * G + j)."""
    return z.view(b, n, kv, g, z.shape[-1]).permute(0, 2, 1, 3, 4).reshape(b, kv, n * g, z.shape[-1])


_POSITIONS_CHECKED: list = [None]  # (positions tensor, RoPE table length) last found in range


class IntAttention(nn.Module):
    def __init__(self, attn, stats, i: int, in_frac: int, resid_frac: int, smooth_in, cfg):
        super().__init__()
        self.layer, self.h, self.kv, self.d, self.window = attn.layer, attn.h, attn.kv, attn.d, attn.window
        self.fq = frac_for(stats[f"L{i}.q"].max(), INTER_TOP)
        self.fk = frac_for(stats[f"L{i}.k"].max(), INTER_TOP)
        lin = attn.q_proj, attn.k_proj, attn.v_proj
        bias = [p.bias for p in lin]
        self.q_proj = IntLinear(lin[0].weight, bias[0], in_frac, 2.0**-self.fq, smooth_in)
        self.k_proj = IntLinear(lin[1].weight, bias[1], in_frac, 2.0**-self.fk, smooth_in)
        v_max = stats[f"L{i}.v"].double()
        self.s_v = torch.where(v_max > 0, v_max / 127, torch.ones_like(v_max))  # (Hkv*d,)
        self.v_proj = IntLinear(lin[2].weight, bias[2], in_frac, self.s_v, smooth_in, limit=128)
        self.q_norm = self.k_norm = None
        fq, fk = self.fq, self.fk
        if attn.q_norm is not None:
            self.q_norm, self.k_norm = IntRMSNorm(attn.q_norm, fq), IntRMSNorm(attn.k_norm, fk)
            fq, fk = self.q_norm.out_frac, self.k_norm.out_frac
        j = int(stats["rope_index"][i])
        self.cos, self.sin = stats[f"rope{j}.cos"], stats[f"rope{j}.sin"]
        self.score_m, self.score_e = iops.dyadic(cfg.scale * 2.0 ** (SCORE_FRAC - fq - fk) / 127**2, 18)
        self.fo = frac_for(stats[f"L{i}.o_in"].max(), INTER_TOP)
        s_v_heads = self.s_v.view(self.kv, 1, self.d).expand(self.kv, self.h // self.kv, self.d)
        self.o_m, self.o_e = _dyadic_vec(s_v_heads.reshape(self.h, self.d) * 2.0 ** (self.fo - PROB_BITS), 24)
        self.o_proj = IntLinear(attn.o_proj.weight, None, self.fo, 2.0**-resid_frac)
        self.qkv = FusedIntLinear([self.q_proj, self.k_proj, self.v_proj])
        self._init_kernel_params()

    def _init_kernel_params(self) -> None:
        """Integers for the elementwise kernel path (kernel_ok False: torch path only)."""
        norms = (self.q_norm, self.k_norm) if self.q_norm is not None else ()
        tables_fit = all(bool(t.numel() == 0 or t.long().abs().max() < 1 << 31) for t in (self.cos, self.sin))
        self.kernel_ok = (
            self.qkv.kparams is not None
            and self.o_proj.kparams is not None
            and self.d % 2 == 0
            and all(n.kparams is not None for n in norms)
            and tables_fit
        )
        # int32 RoPE tables for the kernel: one widened copy per calibration table, shared by the layers
        self.cos32, self.sin32 = (_int32_table(t) if tables_fit else t for t in (self.cos, self.sin))
        self.o_m_flat, self.o_e_flat = self.o_m.reshape(-1).contiguous(), self.o_e.reshape(-1).contiguous()  # (H*D,)

    def _check_positions(self, positions: torch.Tensor) -> None:
        """Positions within the calibrated RoPE table; checked once per step (every layer gets the same
        tensor): the max is a host synchronisation on a GPU."""
        last = _POSITIONS_CHECKED[0]
        if last is not None and last[0] is positions and last[1] == self.cos.shape[0]:
            return
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} beyond the calibrated RoPE table ({self.cos.shape[0]})")
        _POSITIONS_CHECKED[0] = (positions, self.cos.shape[0])  # holds the tensor: `is` cannot see a reused id

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._check_positions(positions)
        return iops.rope_int(x, positions, self.cos, self.sin, 14)

    def forward_kernel(self, x: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """`forward` through the elementwise kernels (same bits): fused epilogues, norm + RoPE + quantisation."""
        t, h, kv, d = x.shape[0], self.h, self.kv, self.d
        self._check_positions(positions)
        y = self.qkv.forward_kernel(x)  # (T, (H + 2 Hkv) * D) int32: q | k | v
        qn = kn = None
        if self.q_norm is not None:
            qn, kn = self.q_norm.kparams, self.k_norm.kparams
        q8, qa16, qsa = iew.head_post(y[:, : h * d].view(t, h, d), qn, positions, self.cos32, self.sin32, 14)
        k8, ka16, ksa = iew.head_post(y[:, h * d : (h + kv) * d].view(t, kv, d), kn, positions, self.cos32, self.sin32)
        v8 = y[:, (h + kv) * d :].reshape(t, kv, d).to(torch.int8)  # (T, Hkv, D)
        o = self.attend(q8, qa16, qsa, k8, ka16, ksa, v8, ctx)  # (T, H, D) int64
        oq = iew.requant_quantize(o.view(t, h * d), self.o_m_flat, self.o_e_flat, LIMIT)  # (T, H*D) int8
        return self.o_proj.from_quantized(*oq)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        if self.kernel_ok and _use_elementwise(x):
            return self.forward_kernel(x, positions, ctx)
        t, h, kv, d = x.shape[0], self.h, self.kv, self.d
        q, k, v = self.qkv(x)
        q, k, v8 = q.view(t, h, d), k.view(t, kv, d), v.view(t, kv, d).to(torch.int8)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q8, qa16, qsa = iops.quantize_rows(self._rope(q, positions))  # (T, H, D), (T, H, 1) x2
        k8, ka16, ksa = iops.quantize_rows(self._rope(k, positions))
        o = self.attend(q8, qa16, qsa, k8, ka16, ksa, v8, ctx)
        o = iops.requantise(o, self.o_m, self.o_e).clamp_(-LIMIT + 1, LIMIT - 1)  # Q.fo
        return self.o_proj(o.reshape(t, h * d))  # (T, H*D) -> (T, hidden)

    def attend(
        self,
        q8: torch.Tensor,
        qa16: torch.Tensor,
        qsa: torch.Tensor,
        k8: torch.Tensor,
        ka16: torch.Tensor,
        ksa: torch.Tensor,
        v8: torch.Tensor,
        ctx,
    ) -> torch.Tensor:
        """Store the new keys/values in ctx and return sum_j p_j v_j (T, H, D) int64, p in Q.PROB_BITS.

        q8 (T, H, D) int8 with qa16, qsa (T, H, 1); k8, v8 (T, Hkv, D) int8 with ka16, ksa (T, Hkv, 1).
        With the C kernel (and a context offering `int_attention_paged`) the keys are read in place
        from the cache; otherwise the torch reference path gathers them. Both give the same bits.
        """
        t, h, kv, d = q8.shape[0], self.h, self.kv, self.d
        g = h // kv
        o = torch.empty(t, h, d, dtype=torch.int64)
        paged = getattr(ctx, "int_attention_paged", None)
        if paged is not None and not iops.accelerator_path(q8) and _use_kernel():
            for tokens, pos, cache, table, table_row in paged(self.layer, k8, ka16, ksa, v8):
                iattn.attend_paged(
                    (q8, qa16, qsa), cache, tokens, pos, table, table_row, self.window,
                    self.score_m, self.score_e, o, SCORE_FRAC, PROB_BITS,
                )  # fmt: skip
            return o
        for q_idx, (kc, kac, ksc, vc), key_pos, q_pos in ctx.int_attention_batches(self.layer, k8, ka16, ksa, v8):
            b, n = q_idx.shape  # b sequences (or rows) with n queries each; keys (b, L, Hkv, .)
            mask = key_pos[:, None, :] <= q_pos[:, :, None]  # (b, n, L)
            if self.window is not None:
                mask &= key_pos[:, None, :] > q_pos[:, :, None] - self.window
            mask = mask[:, None, :, None, :].expand(b, 1, n, g, mask.shape[-1]).reshape(b, 1, n * g, -1)

            idx = q_idx.reshape(-1)
            qg = tuple(_group_heads(z[idx], b, n, kv, g) for z in (q8, qa16, qsa))
            kg = tuple(z.permute(0, 2, 1, 3) for z in (kc, kac, ksc))
            vg = vc.permute(0, 2, 1, 3)
            out = iops.attend_int(qg, kg, vg, mask, self.score_m, self.score_e, SCORE_FRAC, PROB_BITS)
            o[idx] = out.view(b, kv, n, g, d).permute(0, 2, 1, 3, 4).reshape(b * n, h, d)
        return o


class IntegerMode:
    """Swap a float Decoder's modules for integer ones, from calibration stats."""

    name = "integer"

    def __init__(self, stats: dict[str, torch.Tensor], smooth: bool = True, kernel_checks: bool | None = None):
        """kernel_checks: run integer_ops' per-op overflow assertions inside the forward (slow; for tests).
        None reads DITTO_INT_CHECKS=1 from the environment. The residual-stream bound (< 2^30) is always checked."""
        self.stats = stats
        self.smooth = smooth
        self.logit_frac: int | None = None
        if kernel_checks is None:
            kernel_checks = os.environ.get("DITTO_INT_CHECKS", "0") == "1"
        self.kernel_checks = kernel_checks

    def apply(self, model, device: str | torch.device = "cpu"):
        """Swap the modules of the float `model` (on the CPU: every integer is derived there, the same
        on every machine), then move the integer model to `device`."""
        device = torch.device(device)
        cfg, st = model.cfg, self.stats
        if cfg.final_logit_softcap:
            raise NotImplementedError("integer mode: final_logit_softcap is not supported yet")
        r = frac_for(st["resid"].max(), RESID_TOP, hi=30)
        w8, s_w = quant_weight(model.embed.weight)
        embed_scale = float(torch.tensor(model.embed.scale, dtype=model.embed.weight.dtype))
        new_embed = IntEmbedding(w8, s_w, embed_scale, r)
        for i, blk in enumerate(model.layers):
            a, mlp = blk.attn, blk.mlp
            s_a = s_f = None
            if self.smooth:
                s_a = smooth_factors(st[f"L{i}.attn_in"], [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                s_f = smooth_factors(st[f"L{i}.ffn_in"], [mlp.gate_proj.weight, mlp.up_proj.weight])
            blk.input_norm = IntRMSNorm(blk.input_norm, r, smooth=s_a)
            blk.pre_ffn_norm = IntRMSNorm(blk.pre_ffn_norm, r, smooth=s_f)
            if blk.post_attn_norm is not None:
                blk.post_attn_norm = IntRMSNorm(blk.post_attn_norm, r, out_frac=r)
                blk.post_ffn_norm = IntRMSNorm(blk.post_ffn_norm, r, out_frac=r)
            # with sandwich norms the attention/MLP outputs feed a norm, not the residual: same format
            blk.attn = IntAttention(a, st, i, blk.input_norm.out_frac, r, s_a, cfg)
            blk.mlp = IntMLP(mlp, st, i, blk.pre_ffn_norm.out_frac, r, cfg.activation, s_f)
        model.norm = IntRMSNorm(model.norm, r)
        self.logit_frac = frac_for(st["logits"].max(), LOGIT_TOP, hi=24)
        model.lm_head = IntLMHead(model.lm_head.weight, model.norm.out_frac, self.logit_frac)
        model.embed = new_embed
        model.integer_mode = self
        forward, checks = model.forward, self.kernel_checks
        from ditto.numerics.integer_lean import LeanIntDecoder

        if device.type == "cpu":
            lean = LeanIntDecoder.build(model)  # the same kernels with the fewest dispatches (engine steps)
        else:  # the C kernels are the CPU's: elsewhere the torch ops run (same bits)
            lean = None
            to_device(model, device)

        def checked_forward(*args, **kwargs):  # the kernels' checks as chosen for this model, restored after
            old = iops._CHECKS
            iops._CHECKS = checks
            try:
                if lean is not None and len(args) == 3 and not kwargs and lean.usable(args[0], args[2]):
                    return lean.forward(*args)
                return forward(*args, **kwargs)
            finally:
                iops._CHECKS = old

        model.forward = checked_forward
        compute_logits = model.compute_logits

        def checked_logits(hidden):  # the LM head under the same checks (off: its fused epilogue kernel runs)
            old = iops._CHECKS
            iops._CHECKS = checks
            try:
                return compute_logits(hidden)
            finally:
                iops._CHECKS = old

        model.compute_logits = checked_logits
        return model

    def logits_int(self, logits: torch.Tensor) -> torch.Tensor:
        """The exact integer logits (int64) behind the float32 logits of an integer model."""
        return (logits.double() * 2.0**self.logit_frac).long()

    @property
    def logit_scale(self) -> float:
        return 2.0**-self.logit_frac


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move an integer model to `device`: its parameters and buffers, and the tensors its modules keep as
    plain attributes (int8 weights, dyadic multipliers, biases, rotary tables; alone or in lists, tuples
    and dicts). A tensor shared by several modules is moved once and stays shared."""
    model.to(device)
    moved: dict[int, torch.Tensor] = {}

    def move(value):
        if isinstance(value, torch.Tensor):
            if id(value) not in moved:
                moved[id(value)] = value.to(device)
            return moved[id(value)]
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    for module in model.modules():
        for name, value in list(vars(module).items()):
            if not name.startswith("_") and isinstance(value, (torch.Tensor, list, tuple, dict)):
                object.__setattr__(module, name, move(value))
    return model


class DenseIntContext:
    """Contiguous integer KV cache per sequence id: for tests, scoring and reference runs.

    Call `step([(seq_id, num_tokens), ...])` before each forward; tokens are flattened in that order.
    """

    def __init__(self):
        self.kv: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.items: list[tuple[object, int]] = []

    def step(self, items):
        self.items = list(items)
        return self

    def _store(self, layer: int, k8, ka16, ksa, v8) -> list[tuple[int, int, tuple[torch.Tensor, ...]]]:
        """Append the step's keys/values; per sequence (token offset, n new tokens, its whole cache)."""
        out, off = [], 0
        for seq, n in self.items:
            new = (k8[off : off + n], ka16[off : off + n], ksa[off : off + n], v8[off : off + n])
            old = self.kv.get((seq, layer))
            cur = new if old is None else tuple(torch.cat([a, b]) for a, b in zip(old, new))
            self.kv[(seq, layer)] = cur
            out.append((off, n, cur))
            off += n
        return out

    def int_attention_batches(self, layer, k8, ka16, ksa, v8):
        batches = []
        for off, n, cur in self._store(layer, k8, ka16, ksa, v8):
            length = cur[0].shape[0]
            q_idx = torch.arange(off, off + n)[None]
            batches.append((q_idx, tuple(c[None] for c in cur), torch.arange(length)[None], q_idx - off + length - n))
        return batches

    def int_attention_paged(self, layer: int, k8, ka16, ksa, v8) -> list[tuple]:
        """The kernel's form of `int_attention_batches`: each sequence's cache as one block of its length."""
        batches = []
        for off, n, (kc, kac, ksc, vc) in self._store(layer, k8, ka16, ksa, v8):
            length = kc.shape[0]
            cache = (kc[None], kac.to(torch.int32)[None], ksc.to(torch.int8)[None], vc[None])  # (1, L, Hkv, .)
            tokens, pos = torch.arange(off, off + n), torch.arange(length - n, length)
            batches.append((tokens, pos, cache, torch.zeros(1, 1, dtype=torch.long), torch.zeros(n, dtype=torch.long)))
        return batches


class IntKVCache:
    """Paged integer KV cache: per layer k8, v8 (blocks, bs, Hkv, D) int8, k scales (blocks, bs, Hkv, 1)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int):
        shape, sshape = (num_blocks, block_size, kv_heads, head_dim), (num_blocks, block_size, kv_heads, 1)
        # reserved, not touched (see ditto.engine.attention.KVCache): blocks are zeroed as they are handed out
        self.k = [torch.empty(shape, dtype=torch.int8) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=torch.int8) for _ in range(num_layers)]
        self.ka16 = [torch.empty(sshape, dtype=torch.int32) for _ in range(num_layers)]  # unused slots: masked
        self.ksa = [torch.empty(sshape, dtype=torch.int8) for _ in range(num_layers)]
        self.block_size = block_size

    def clear_blocks(self, blocks: list[int]) -> None:
        """Zero the given blocks (handed out by the block manager since the last step)."""
        from ditto.engine.attention import clear_blocks

        clear_blocks(self.k + self.v + self.ka16 + self.ksa, blocks)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src, dst = torch.tensor([s for s, _ in copies]), torch.tensor([d for _, d in copies])
            for t in self.k + self.v + self.ka16 + self.ksa:
                t[dst] = t[src]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int) -> int:
        return num_layers * kv_heads * (2 * head_dim + 5)


class IntegerPagedAttention:
    """Integer twin of ditto.engine.attention.PagedAttention (same slots / DecodeRows / PrefillChunk).

    With the C kernel (`int_attention_paged`) every query of the step runs in one call that reads
    the cache in place. On the torch path (`int_attention_batches`) decode rows of all sequences run
    as one batch: each row's blocks are gathered into a padded (R, max blocks) table; keys past a
    row's position are masked to exact zeros, so padding, batch composition and order cannot change
    a row (integer arithmetic is exact in any order anyway).
    A prefill chunk runs as a batch of one sequence.
    """

    def __init__(self, cache: IntKVCache, slots, decode, prefills):
        self.cache, self.slots, self.decode, self.prefills = cache, slots, decode, prefills
        self._table = None
        self._index: tuple[torch.Tensor, ...] | None = None
        if decode is not None:
            rows = decode.block_row
            counts = torch.bincount(rows, minlength=len(decode.tok_index))
            starts = torch.cumsum(counts, 0) - counts
            table = torch.zeros(len(counts), int(counts.max()), dtype=torch.long)
            table[rows, torch.arange(len(rows)) - starts[rows]] = decode.blocks
            self._table = table  # (R, nbmax); padding -> block 0, masked (positions beyond the row)

    def _store(self, layer: int, k8, ka16, ksa, v8) -> tuple[torch.Tensor, ...]:
        """Write the step's keys/values into their slots; the layer's (k8, ka16, ksa, v8) cache tensors."""
        c = self.cache
        store = (c.k[layer], c.ka16[layer], c.ksa[layer], c.v[layer])
        for dst, src in zip(store, (k8, ka16, ksa, v8)):
            dst.view(-1, *dst.shape[2:])[self.slots] = src.to(dst.dtype)  # write before reading
        return store

    def int_attention_batches(self, layer, k8, ka16, ksa, v8):
        store = self._store(layer, k8, ka16, ksa, v8)
        bs = self.cache.block_size
        batches = []
        if self.decode is not None:
            r, nb = self._table.shape
            kv = tuple(t[self._table].reshape(r, nb * bs, *t.shape[2:]) for t in store)
            kv = (kv[0], kv[1].long(), kv[2].long(), kv[3])
            key_pos = torch.arange(nb * bs)[None].expand(r, -1)
            batches.append((self.decode.tok_index[:, None], kv, key_pos, self.decode.positions[:, None]))
        for ch in self.prefills:
            length = ch.start_pos + ch.num_tokens
            kv = tuple(t[ch.blocks].reshape(-1, *t.shape[2:])[:length][None] for t in store)
            kv = (kv[0], kv[1].long(), kv[2].long(), kv[3])
            q_idx = torch.arange(ch.tok_start, ch.tok_start + ch.num_tokens)[None]
            batches.append((q_idx, kv, torch.arange(length)[None], torch.arange(ch.start_pos, length)[None]))
        return batches

    def _paged_index(self) -> tuple[torch.Tensor, ...]:
        """(tokens, positions, table, table_row) of every query of the step: decode rows, then chunks.

        One table row per decode row and per prefill chunk, zero padded to the widest (padding is
        never read: it lies past every query's position). Built once per step, shared by the layers.
        """
        if self._index is None:
            tokens, pos, tables, rows = [], [], [], []
            if self.decode is not None:
                r = self._table.shape[0]
                tokens.append(self.decode.tok_index)
                pos.append(self.decode.positions)
                tables.append(self._table)
                rows.append(torch.arange(r))
            for ch in self.prefills:
                n = ch.num_tokens
                tokens.append(torch.arange(ch.tok_start, ch.tok_start + n))
                pos.append(torch.arange(ch.start_pos, ch.start_pos + n))
                rows.append(torch.full((n,), sum(t.shape[0] for t in tables), dtype=torch.long))
                tables.append(ch.blocks.long()[None])
            width = max((t.shape[1] for t in tables), default=1)
            table = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables])  # (rows, width)
            self._index = (torch.cat(tokens), torch.cat(pos), table, torch.cat(rows))
        return self._index

    def int_attention_paged(self, layer: int, k8, ka16, ksa, v8) -> list[tuple]:
        """The kernel's form of `int_attention_batches`: one batch reading the cache in place."""
        store = self._store(layer, k8, ka16, ksa, v8)
        if self.decode is None and not self.prefills:
            return []
        tokens, positions, table, table_row = self._paged_index()
        return [(tokens, positions, store, table, table_row)]
