"""Numerics `gguf`: run a GGUF file on its own weight blocks, as llama.cpp does, batch invariant by construction.

Every linear whose weight the file stores in blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
Q6_K) is computed straight from those bytes, a view of the mapped file: nothing is dequantised at
load, and a decode step reads the file's 4-8 bits per weight instead of 32. Activations are
quantised to 8-bit blocks on the fly (kernels/gguf_reference.py states the contract; the C kernels
of kernels/gguf_blocks.py meet it bit for bit). Each output element is one fixed chain over its
row's blocks, so a row's result never depends on the batch, its position, the thread count or the
instruction set: the mode is `batch_invariant` at no extra cost.

* Two kernels meet that contract: multiply-add (gguf_blocks, vpdpbusd) and T-MAC-style lookup
  tables (gguf_lut, Q4_0/Q4_1 on a bit-plane copy of the weight). The LUT is faster for one or two
  rows (single-stream decode: 1.4-1.7x per linear here), multiply-add from three or four rows on,
  so a call picks by its row count; the bits are the same either way. The LUT's weight copy is
  made once a linear has seen 64 one- or two-row calls (short answers never pay for it) and costs
  the Q4 weights' bytes once more in memory (prefill and batches keep multiply-add on the file's
  rows); DITTO_GGUF_LUT=0 keeps to multiply-add.
* The embedding table stays in its blocks too; a lookup decodes only the rows it needs (the values
  equal the float modes' table bit for bit). With tied embeddings the LM head runs on the same blocks.
* q/k/v and gate/up projections of the same block type are fused into one call (their rows side by
  side): the kernel computes every output element on its own, so fusing changes no bit.
* Norms, rotary embeddings, attention and the residual stream are fp32; the KV cache is bf16
  (batched decode reads the cache more than the weights: half the bytes, attention 1.6x faster at
  32 rows here; KL to fp32 2.54e-3 instead of 2.47e-3 with an fp32 cache; --kv-dtype overrides).
  RMSNorm runs as one C call (kernels/rowops.py), its sum of squares in a fixed order of its own
  (the bits depend on the row alone); RoPE is the model's (one C call for fp32 on a CPU, bit-equal
  to the torch ops).
* A linear the file stores in float (F32/F16/BF16) runs on the fixed-order fp32 C kernel.

CPU only, GGUF files only: an HF folder has no blocks to run (use fp32, bf16, w4 ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ditto.models.layers import Embedding, RMSNorm, Rotary
from ditto.numerics.base import NumericsMode, register
from ditto.numerics.kernels import gguf_lut, gguf_reference, rowops
from ditto.numerics.kernels.gguf_blocks import block_linear

LUT_MAX_ROWS = 2  # calls of at most this many rows take the LUT kernel (it wins at M = 1-2, MAD from 3-4 on)
LUT_ENV = "DITTO_GGUF_LUT"  # "0": the multiply-add kernel for every call
# the LUT's weight copy is made at a linear's 64th small call: a repack costs ~0.5 ms and saves ~8 us
# a call, so short answers (a 16-token demo) never pay for it, and long decodes get it early
LUT_AFTER_CALLS = 64


class GGUFLinear(nn.Module):
    """nn.Linear replacement computed on raw GGUF blocks: uint8 (out_features, row_bytes), fp32 output."""

    batch_invariant_kernel = True  # rows never depend on the batch (padded.make_invariant skips it)

    def __init__(self, blocks: torch.Tensor, kind: str, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        if kind not in gguf_reference.BLOCKS:
            raise ValueError(f"no gguf kernel for {kind}; supported: {', '.join(gguf_reference.KINDS)}")
        if blocks.shape[1] != gguf_reference.row_bytes(kind, in_features):
            raise ValueError(f"{kind} rows of {blocks.shape[1]} bytes do not hold {in_features} inputs")
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        self.lut_ok = False  # may small calls use the LUT kernel (allow_lut)
        self.lut = None  # its weight copy, once made (not a buffer: the same bytes as `blocks`)
        self.small_calls = 0  # small calls before the copy exists
        self.register_buffer("blocks", blocks, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        # plain references to the same tensors: a decode step reads them ~120 times per token, and
        # nn.Module's buffer lookup (__getattr__) costs a microsecond each time (CPU-only mode: no .to())
        self._rows, self._bias = self.blocks, self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> GGUFLinear | None:
        """The block linear for a loaded nn.Linear, or None when its weight has no GGUF blocks."""
        source = getattr(linear, "gguf_source", None)
        if source is None or source.kind not in gguf_reference.BLOCKS:
            return None
        bias = None if linear.bias is None or linear.bias.is_meta else linear.bias
        return cls(source.rows(), source.kind, linear.in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lut_ok and x.dim() == 2 and x.shape[0] <= LUT_MAX_ROWS:
            if self.lut is None:
                self.small_calls += 1
                if self.small_calls >= LUT_AFTER_CALLS:  # a long decode: the copy pays for itself from here
                    self.lut = gguf_lut.LutCall(gguf_lut.repack(self._rows, self.kind), self._bias)
            if self.lut is not None:
                return self.lut(x)
        return block_linear(x, self._rows, self.kind, self._bias)

    def allow_lut(self) -> bool:
        """Let calls of at most LUT_MAX_ROWS rows run the lookup-table kernel on a T-MAC bit-plane copy
        of a Q4_0/Q4_1 weight, made at the LUT_AFTER_CALLS-th such call (the LUT kernel meets the same
        contract bit for bit, so which one runs changes nothing in the result). False when the kind has no LUT
        kernel, it is not built, or DITTO_GGUF_LUT=0."""
        self.lut_ok = self.kind in ("Q4_0", "Q4_1") and os.environ.get(LUT_ENV) != "0" and gguf_lut.kernel_available()
        return self.lut_ok

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def fuse_linears(linears: list[nn.Module]) -> GGUFLinear | None:
    """One GGUFLinear whose output is the given ones' side by side, when they share block type and
    input size and all or none have a bias; else None."""
    if not linears or not all(isinstance(lin, GGUFLinear) for lin in linears):
        return None
    first = linears[0]
    if any(lin.kind != first.kind or lin.in_features != first.in_features for lin in linears):
        return None
    biases = [lin.bias for lin in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat(biases)
    return GGUFLinear(torch.cat([lin.blocks for lin in linears]), first.kind, first.in_features, bias)


class BlockEmbedding(nn.Module):
    """Embedding lookup that decodes only the looked-up rows from the file's blocks (fp32 output)."""

    def __init__(self, blocks: torch.Tensor, kind: str, dim: int, scale: float = 1.0):
        super().__init__()
        self.kind, self.dim, self.scale = kind, dim, scale
        self.register_buffer("blocks", blocks, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[ids.reshape(-1)].numpy()  # (T, row_bytes)
        x = torch.from_numpy(np.ascontiguousarray(gguf_reference.dequantize(rows, self.kind, self.dim)))
        x = x.reshape(*ids.shape, self.dim)
        if self.scale != 1.0:
            x = x * torch.tensor(self.scale, dtype=torch.float32)  # as Embedding: scale in the table's dtype
        return x

    def extra_repr(self) -> str:
        return f"{self.blocks.shape[0]}, {self.dim}, kind={self.kind}"


class RowRMSNorm(nn.Module):
    """RMSNorm in one C call, its sum of squares in a fixed order (kernels/rowops.py): fp32 in and out."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps, self.offset = float(norm.eps), float(norm.offset)
        self.register_buffer("weight", norm.weight.detach().float().contiguous(), persistent=False)
        self._w = self.weight  # a plain reference: no buffer lookup per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowops.rmsnorm(x, self._w, self.offset, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"


class GGUFBlock(nn.Module):
    """A decoder layer of this mode with the fewest Python dispatches: the same kernels, on the same
    values, in the same order as `Block`'s modules (so the same bits), called directly instead of
    through eleven module calls; q and k rotate in one call (both are views of the fused qkv rows).

    At batch 1 a decode step of a small model is mostly dispatch: this keeps only the kernels.
    Built by `GGUFBlock.wrap` for a block whose parts this mode converted (fused qkv and gate/up on
    blocks, C norms and rotary); any other block stays as it is."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        attn, mlp = block.attn, block.mlp
        self.h, self.kv, self.d = attn.h, attn.kv, attn.d
        self.layer, self.window = attn.layer, attn.window
        self.q_cols, self.kv_cols = attn.h * attn.d, attn.kv * attn.d
        # the parts as plain references (not registered twice; nn.Module's attribute lookup costs a
        # microsecond each, ~20 per layer and token): the block's modules as they are when wrapped
        self.__dict__["_parts"] = (
            block.input_norm, attn.qkv_proj, attn.rotary, attn.o_proj, block.post_attn_norm,
            block.pre_ffn_norm, mlp.gate_up_proj, mlp.act, mlp.down_proj, block.post_ffn_norm,
        )  # fmt: skip
        self.__dict__["_memo"] = [None, 0]  # the last step's positions and the table rows they need

    def _tables(self, rotary: Rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables covering `positions`; every layer of a step gets the same positions tensor,
        so its max is read once per step, not once per layer."""
        memo = self._memo
        if positions is not memo[0]:
            memo[0], memo[1] = positions, int(positions.max()) + 1
        return rotary.tables(memo[1])

    @staticmethod
    def wrap(block: nn.Module) -> nn.Module:
        attn, mlp = block.attn, block.mlp
        norms = [block.input_norm, block.pre_ffn_norm, block.post_attn_norm, block.post_ffn_norm]
        ok = (
            isinstance(attn.qkv_proj, GGUFLinear)
            and isinstance(attn.o_proj, GGUFLinear)
            and isinstance(mlp.gate_up_proj, GGUFLinear)
            and isinstance(mlp.down_proj, GGUFLinear)
            and all(n is None or isinstance(n, RowRMSNorm) for n in norms)
            and attn.q_norm is None
            and isinstance(attn.rotary, Rotary)
        )
        return GGUFBlock(block) if ok else block

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        in_norm, qkv_proj, rotary, o_proj, post_attn, pre_ffn, gate_up, act, down, post_ffn = self._parts
        t = x.shape[0]
        h = in_norm.forward(x)
        qkv = qkv_proj.forward(h)  # (T, (H + 2 Hkv) D)
        cos, sin = self._tables(rotary, positions)
        qk = qkv[:, : self.q_cols + self.kv_cols].view(t, self.h + self.kv, self.d)  # (T, H + Hkv, D)
        qk = rowops.rope(qk, positions, cos, sin)
        q, k = qk[:, : self.h], qk[:, self.h :]
        v = qkv[:, self.q_cols + self.kv_cols :].view(t, self.kv, self.d)  # (T, Hkv, D)
        out = ctx.attention(self.layer, q, k, v, self.window)  # (T, H, D)
        a = o_proj.forward(out.reshape(t, self.q_cols))
        if post_attn is not None:
            a = post_attn.forward(a)
        x, h = rowops.add_rmsnorm(x, a, pre_ffn._w, pre_ffn.offset, pre_ffn.eps)  # the residual add and the norm
        gate, up = gate_up.forward(h).chunk(2, dim=-1)
        f = down.forward(act.forward(gate) * up)
        if post_ffn is not None:
            f = post_ffn.forward(f)
        return x + f


@dataclass(frozen=True)
class GGUFMode(NumericsMode):
    runs_on_blocks: bool = True  # LLM loads the file without decoding its blocks

    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        block = GGUFLinear.from_linear(linear)
        if block is not None:
            return block
        if linear.weight.is_meta:
            raise ValueError(f"a {type(linear).__name__} has neither GGUF blocks nor loaded weights")
        from ditto.numerics.kernels.batch_invariant import InvariantLinear

        return InvariantLinear.from_linear(linear, compute_dtype=torch.float32)

    def convert_embedding(self, emb: nn.Module) -> nn.Module:
        source = getattr(emb, "gguf_source", None)
        if isinstance(emb, Embedding) and source is not None and source.kind in gguf_reference.BLOCKS:
            return BlockEmbedding(source.rows(), source.kind, emb.weight.shape[1], emb.scale)
        return super().convert_embedding(emb)

    def convert_norm(self, norm: nn.Module) -> nn.Module:
        return RowRMSNorm(norm)

    def prepare(self, loaded, config):
        from ditto.models.decoder import fuse_projections
        from ditto.numerics import Prepared

        if torch.device(config.device).type != "cpu":
            raise ValueError(f"numerics 'gguf' runs on the CPU only (device {config.device!r}); use fp32 or bf16")
        if loaded.format != "gguf":
            raise ValueError(
                f"numerics 'gguf' computes on a GGUF file's own weight blocks; {loaded.path} is an "
                f"{loaded.format} folder with none: use fp32, bf16, w8a8 or w4"
            )
        model = self.apply(loaded.model)
        fuse_projections(model, fuse_linears)
        model.layers = nn.ModuleList(GGUFBlock.wrap(b) for b in model.layers)
        blocks = [m for m in model.modules() if isinstance(m, GGUFLinear)]
        luts = sum(m.allow_lut() for m in blocks)
        kinds = sorted({m.kind for m in blocks})
        lean = sum(isinstance(b, GGUFBlock) for b in model.layers)
        info = {"weight_blocks": kinds, "block_linears": len(blocks), "lut_linears": luts, "lean_layers": lean}
        from ditto.config import KV_DTYPES

        kv = getattr(torch, KV_DTYPES[config.kv_dtype or self.kv_dtype])
        return Prepared(model, torch.float32, kv, self, info=info)


GGUF = register(
    GGUFMode(
        "gguf",
        torch.float32,
        "the GGUF file's own blocks (Q4_0 ... Q6_K), 8-bit activation blocks",
        "bf16",  # the KV cache: half the bytes a batched decode step reads (fp16 converts slower here)
        description="runs a GGUF file on its own quantised blocks like llama.cpp; batch invariant by construction",
    )
)

__all__ = ["GGUF", "BlockEmbedding", "GGUFBlock", "GGUFLinear", "GGUFMode", "RowRMSNorm", "fuse_linears"]
