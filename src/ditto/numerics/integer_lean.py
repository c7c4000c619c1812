"""The integer mode's decoder forward with the fewest Python dispatches: `LeanIntDecoder`.

A decode step of a small integer model was mostly Python: ~13 module calls, ~30 torch ops and ~10
checked kernel wrappers per layer around the 4 int8 GEMMs. This runs the same kernels on the same
values in the same order, so the same bits (tests/test_integer_lean.py compares token ids and
integer logits with the module path), as 4 GEMMs and 6 C calls per layer, with every argument
that does not change within a step prepared once. The GEMMs are torch._int_mm, or for a step of one
token (single-stream decode) ditto_gemv_s8, which streams each (N, K) int8 weight once (the step is
bound by reading the weights: ~132 MB a token for SmolLM2-135M).

  ditto_res_norm_quant  [o_proj / down_proj epilogue -> (post norm) -> residual add ->] the next
                        RMSNorm -> quantize_rows for the next GEMM (or the final norm's hidden state)
  ditto_qkv_post        q|k|v epilogues -> q_norm / k_norm -> RoPE -> quantize_rows; keys and values
                        written straight into their cache slots
  ditto_int_attend      the paged attention kernel (kernels/integer_attention_c.py)
  ditto_requant_quant   P.V requantisation -> quantize_rows for o_proj
  ditto_mlp             gate|up epilogues -> activation -> product -> quantize_rows for down_proj

It runs when every layer has its kernel path (IntegerMode's modules with kernel parameters), the
elementwise and attention kernels are built, the integer_ops bound checks are off, and the step's
context is the engine's IntegerPagedAttention; otherwise the module path runs (the reference for
this one, as the torch ops are for the kernels). Every index a kernel dereferences (positions,
slots, tokens, block table) is checked once per step before the first call.
"""

from __future__ import annotations

import ctypes

import torch

from ditto.numerics import integer as im
from ditto.numerics.kernels import integer_attention_c as iattn
from ditto.numerics.kernels import integer_elementwise_c as iew
from ditto.numerics.kernels import integer_ops as iops


def _addr(struct) -> int | None:
    return None if struct is None else ctypes.addressof(struct)


def _norm(norm) -> int | None:
    """The C Norm struct address of an IntRMSNorm (None for no norm)."""
    return None if norm is None else _addr(norm.kparams.struct)


class _Layer:
    """One decoder layer's kernel arguments (tensors kept alive by the modules they come from)."""

    def __init__(self, blk):
        a, mlp = blk.attn, blk.mlp
        self.h, self.kv, self.d, self.layer = a.h, a.kv, a.d, a.layer
        self.in_norm, self.pre_ffn = _norm(blk.input_norm), _norm(blk.pre_ffn_norm)
        self.post_attn, self.post_ffn = _norm(blk.post_attn_norm), _norm(blk.post_ffn_norm)
        self.qn, self.kn = _norm(a.q_norm), _norm(a.k_norm)
        self.w_qkv = a.qkv.w8.t()  # (K, N) views of the (N, K) int8 weights, as torch._int_mm takes them
        self.w_o = a.o_proj.w8.t()
        self.w_gu = mlp.gate_up.w8.t()
        self.w_down = mlp.down_proj.w8.t()
        # one-row steps (single-stream decode) run ditto_gemv_s8 on the (N, K) weights: (w, row sums, N, K)
        self._sums = [iew.row_sums(w) for w in (a.qkv.w8, a.o_proj.w8, mlp.gate_up.w8, mlp.down_proj.w8)]
        self.gemv = [
            (w.data_ptr(), s.data_ptr(), *w.shape)
            for w, s in zip((a.qkv.w8, a.o_proj.w8, mlp.gate_up.w8, mlp.down_proj.w8), self._sums)
        ]
        self.qkv_epi = _addr(a.qkv.kparams.struct)
        self.o_epi = _addr(a.o_proj.kparams.struct)
        self.down_epi = _addr(mlp.down_proj.kparams.struct)
        self.rope = (a.cos32.data_ptr(), a.sin32.data_ptr())
        self.rope_rows = a.cos32.shape[0]
        self.window = iattn.window_arg(a.window)
        self.score = (a.score_m, a.score_e)
        self.o_me = (a.o_m_flat.data_ptr(), a.o_e_flat.data_ptr())
        p, e = mlp.kparams, mlp.kparams.epi
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.mlp = (ptr(e.m), ptr(e.bias), ptr(e.seg_shift), ptr(e.seg_lo), ptr(e.seg_hi), int(p.gelu), p.frac)
        self.mlp += (p.gconst.data_ptr(), p.pshift, p.hlim)
        self.inter = mlp.down_proj.w8.shape[1]

    @staticmethod
    def fits(blk) -> bool:
        a, mlp = blk.attn, blk.mlp
        norms = [blk.input_norm, blk.pre_ffn_norm, blk.post_attn_norm, blk.post_ffn_norm, a.q_norm, a.k_norm]
        return (
            isinstance(a, im.IntAttention)
            and isinstance(mlp, im.IntMLP)
            and a.kernel_ok
            and mlp.kparams is not None
            and all(w.is_contiguous() for w in (a.qkv.w8, a.o_proj.w8, mlp.gate_up.w8, mlp.down_proj.w8))
            and all(n is None or (isinstance(n, im.IntRMSNorm) and n.kparams is not None) for n in norms)
            and blk.input_norm is not None
            and blk.pre_ffn_norm is not None
            and (blk.post_attn_norm is None) == (blk.post_ffn_norm is None)
        )


class LeanIntDecoder:
    """`Decoder.forward` of an IntegerMode model through the fused kernels (see the module docstring)."""

    def __init__(self, model, layers: list[_Layer]):
        self.model, self.layers = model, layers
        self.final_norm = _norm(model.norm)
        self.hidden = model.norm.kparams.gm.numel()
        first = layers[0]
        self.shape = (first.h, first.kv, first.d, first.inter)
        self.rope_rows = min(lay.rope_rows for lay in layers)
        self._ws: tuple | None = None  # the step buffers of the last token count

    @classmethod
    def build(cls, model) -> LeanIntDecoder | None:
        """The lean forward of an IntegerMode model, or None when a layer lacks its kernel path."""
        blocks = list(model.layers)
        if not blocks or not all(_Layer.fits(b) for b in blocks):
            return None
        if not isinstance(model.norm, im.IntRMSNorm) or model.norm.kparams is None:
            return None
        layers = [_Layer(b) for b in blocks]
        shape = {(lay.h, lay.kv, lay.d, lay.inter) for lay in layers}
        if len(shape) != 1 or any(b.input_norm.kparams.gm.numel() != model.norm.kparams.gm.numel() for b in blocks):
            return None
        return cls(model, layers)

    @staticmethod
    def usable(x_probe: torch.Tensor, ctx) -> bool:
        """Whether this step can take the lean path (else the module path runs)."""
        return (
            isinstance(ctx, im.IntegerPagedAttention)
            and im._use_elementwise(x_probe)
            and iattn.kernel_available()
            and (ctx.decode is not None or bool(ctx.prefills))
        )

    def _workspace(self, t: int) -> tuple:
        """Buffers for a step of t tokens, reused while the token count stays the same."""
        if self._ws is None or self._ws[0] != t:
            h, _, d, inter = self.shape
            hid = self.hidden
            i8, i64 = torch.int8, torch.int64
            bufs = (
                torch.empty(t, hid, dtype=i8),  # xq: the normed residual, quantized
                torch.empty(t, dtype=i64),
                torch.empty(t, dtype=i64),
                torch.empty(t, h, d, dtype=i8),  # q8 and its row scales
                torch.empty(t, h, dtype=i64),
                torch.empty(t, h, dtype=i64),
                torch.empty(t, h * d, dtype=i64),  # o: the attention's P.V sums
                torch.empty(t, h * d, dtype=i8),  # oq: o requantised and quantized
                torch.empty(t, dtype=i64),
                torch.empty(t, dtype=i64),
                torch.empty(t, inter, dtype=i8),  # hq: the MLP's product, quantized
                torch.empty(t, dtype=i64),
                torch.empty(t, dtype=i64),
                torch.empty(t, (h + 2 * self.shape[1]) * d, dtype=torch.int32),  # GEMV outputs (one-row steps)
                torch.empty(t, hid, dtype=torch.int32),
                torch.empty(t, 2 * inter, dtype=torch.int32),
                torch.empty(t, hid, dtype=torch.int32),
            )
            self._ws = (t, bufs, tuple(b.data_ptr() for b in bufs))
        return self._ws

    def _step_index(self, positions: torch.Tensor, ctx, t: int) -> tuple:
        """The step's checked positions, slots and attention index (shared by every layer)."""
        c = ctx.cache
        nb, bs = c.k[0].shape[0], c.block_size
        pos = positions.to(torch.int64).contiguous()
        slots = ctx.slots.to(torch.int64).contiguous()
        if pos.numel() != t or slots.numel() != t:
            raise ValueError("integer lean forward: one position and one slot per token expected")
        if int(pos.min()) < 0 or int(pos.max()) >= self.rope_rows:
            raise ValueError(f"position {int(pos.max())} beyond the calibrated RoPE table ({self.rope_rows})")
        if int(slots.min()) < 0 or int(slots.max()) >= nb * bs:
            raise ValueError("integer lean forward: cache slot out of range")
        tokens, qpos, table, trow = iattn.check_index(*ctx._paged_index(), t, nb, bs, im.PROB_BITS)
        return pos, slots, tokens, qpos, table, trow

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """ids, positions (T,) -> final post-norm hidden states (T, hidden) int32, as Decoder.forward."""
        x = self.model.embed(ids).contiguous()  # (T, hidden) int32 residual, updated in place
        t, hid = x.shape
        h, kv, d, inter = self.shape
        pos, slots, tokens, qpos, table, trow = self._step_index(positions, ctx, t)
        _, bufs, (xq, xa, xs, q8, qa, qs, o, oq, oa, os_, hq, ha, hs, *gemv_out) = self._workspace(t)
        xq_t, oq_t, hq_t = bufs[0], bufs[7], bufs[10]
        out = torch.empty(t, hid, dtype=torch.int32)
        ew, at = iew.lib(), iattn.lib()
        tab = iops._tables("cpu")["exp2"].data_ptr()
        c = ctx.cache
        n, tstride = tokens.numel(), table.shape[1]
        idx = (tokens.data_ptr(), qpos.data_ptr(), table.data_ptr(), tstride, trow.data_ptr())
        pp, sp, xp = pos.data_ptr(), slots.data_ptr(), x.data_ptr()
        lim = im.LIMIT
        layers = self.layers
        gemv = ew.ditto_gemv_s8 if t == 1 else None

        def linear(x, x_t, w_t, j, lay):  # int32 (T, N) x @ w.T: (the tensor holding it, its pointer, row stride)
            if gemv is not None:
                gw = lay.gemv[j]
                gemv(x, gw[0], gw[1], gw[2], gw[3], gemv_out[j])
                return None, gemv_out[j], gw[2]
            acc = torch._int_mm(x_t, w_t)
            return acc, acc.data_ptr(), acc.shape[1]

        first = layers[0].in_norm
        _check(ew.ditto_res_norm_quant(t, hid, None, 0, None, None, None, None, xp, first, None, xq, xa, xs))
        for i, lay in enumerate(layers):
            li = lay.layer
            kc, kac, ksc, vc = c.k[li], c.ka16[li], c.ksa[li], c.v[li]
            keep, acc, lda = linear(xq, xq_t, lay.w_qkv, 0, lay)  # (T, (H + 2 Hkv) D)
            _check(
                ew.ditto_qkv_post(
                    t, acc, lda, xa, xs, lay.qkv_epi, h, kv, d, lay.qn, lay.kn, pp, *lay.rope, 14,
                    q8, qa, qs, sp, kc.data_ptr(), kac.data_ptr(), ksc.data_ptr(), vc.data_ptr(),
                )
            )  # fmt: skip
            _check(
                at.ditto_int_attend(
                    q8, qa, qs, h, kv, d, kc.data_ptr(), kac.data_ptr(), ksc.data_ptr(), vc.data_ptr(), c.block_size,
                    n, *idx, lay.window, *lay.score, im.SCORE_FRAC, im.PROB_BITS, tab, o, 0,
                )
            )  # fmt: skip
            _check(ew.ditto_requant_quant(o, t, h * d, *lay.o_me, -lim + 1, lim - 1, oq, oa, os_, None))
            keep, acc, lda = linear(oq, oq_t, lay.w_o, 1, lay)  # (T, hidden)
            _check(
                ew.ditto_res_norm_quant(
                    t, hid, acc, lda, oa, os_, lay.o_epi, lay.post_attn, xp, lay.pre_ffn, None, xq, xa, xs
                )
            )
            keep, acc, lda = linear(xq, xq_t, lay.w_gu, 2, lay)  # (T, 2 I)
            _check(ew.ditto_mlp(acc, t, inter, lda, xa, xs, *lay.mlp, tab, hq, ha, hs, None))
            keep, acc, lda = linear(hq, hq_t, lay.w_down, 3, lay)  # (T, hidden)
            last = i == len(layers) - 1
            nxt = self.final_norm if last else layers[i + 1].in_norm
            _check(
                ew.ditto_res_norm_quant(
                    t, hid, acc, lda, ha, hs, lay.down_epi, lay.post_ffn, xp, nxt,
                    out.data_ptr() if last else None, None if last else xq, xa, xs,
                )
            )  # fmt: skip
        return out


def _check(rc: int) -> None:
    if rc < 0:
        raise MemoryError("integer kernel: scratch allocation failed")
