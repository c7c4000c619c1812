"""One decoder-only transformer for Llama (SmolLM2), Qwen2/2.5, Qwen3 and Gemma 3.

The families differ only by flags in ModelConfig: qkv bias (Qwen2), q/k RMSNorm (Qwen3, Gemma 3),
sandwich norms, (1 + w) norms, scaled embeddings, GELU-tanh and sliding-window layers (Gemma 3).
Tokens arrive flattened: (T,) ids of every scheduled sequence with their (T,) positions; the
attention context `ctx` owns the KV cache and knows which token belongs to which sequence.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ditto.config import ModelConfig
from ditto.models.layers import ACTIVATIONS, Embedding, Rotary, make_norm


class AttentionContext(Protocol):
    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Store k, v (T, Hkv, D) for `layer`, attend with q (T, H, D) causally; returns (T, H, D)."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.layer, self.h, self.kv, self.d = layer, h, kv, d
        self.window = cfg.window(layer)
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one call (set by `fuse_projections`)
        self.q_norm = make_norm(cfg, d) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, d) if cfg.qk_norm else None
        local = cfg.layer_types[layer] == "sliding" and cfg.rope_local_theta is not None
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        self.rotary = Rotary(d, theta, None if local else cfg.rope_scaling, cfg.max_position)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None and self.q_norm is None:
            # fused: q and k rotate in one call (rotary is elementwise per head, so the same bits)
            qkv = self.qkv_proj(x)  # (T, (H + 2 Hkv) D)
            qk_cols = (self.h + self.kv) * self.d
            qk = self.rotary(qkv[:, :qk_cols].view(t, self.h + self.kv, self.d), positions)  # (T, H + Hkv, D)
            q, k = qk[:, : self.h], qk[:, self.h :]
            v = qkv[:, qk_cols:].view(t, self.kv, self.d)  # (T, Hkv*D) -> (T, Hkv, D)
        else:
            if self.qkv_proj is not None:
                q, k, v = self.qkv_proj(x).split([self.h * self.d, self.kv * self.d, self.kv * self.d], dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(t, self.h, self.d)  # (T, H*D) -> (T, H, D)
            k = k.view(t, self.kv, self.d)  # (T, Hkv*D) -> (T, Hkv, D)
            v = v.view(t, self.kv, self.d)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        out = ctx.attention(self.layer, q, k, v, self.window)  # (T, H, D)
        return self.o_proj(out.reshape(t, self.h * self.d))  # (T, H*D) -> (T, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one call (set by `fuse_projections`)
        self.act = ACTIVATIONS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = make_norm(cfg) if cfg.sandwich_norm else None
        self.pre_ffn_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.post_ffn_norm = make_norm(cfg) if cfg.sandwich_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.attn(self.input_norm(x), positions, ctx)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_ffn_norm(x))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """ids, positions (T,) -> final post-norm hidden states (T, hidden)."""
        x = self.embed(ids)
        for block in self.layers:
            x = block(x, positions, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, V) float32 logits."""
        logits = self.lm_head(hidden).float()
        if self.cfg.final_logit_softcap:
            cap = self.cfg.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits


def fuse_projections(model: Decoder, fuse) -> int:
    """Replace each layer's q/k/v projections by one `qkv_proj`, and gate/up by one `gate_up_proj`,
    wherever ``fuse(list_of_linears)`` returns a module computing their outputs side by side (None:
    leave that group alone). Meant for kernels that compute every output element on its own, where
    fusing cannot change a single bit. Returns the number of groups fused."""
    fused = 0
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.qkv_proj, attn.q_proj, attn.k_proj, attn.v_proj = qkv, None, None, None
            fused += 1
        gate_up = fuse([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            mlp.gate_up_proj, mlp.gate_proj, mlp.up_proj = gate_up, None, None
            fused += 1
    return fused
