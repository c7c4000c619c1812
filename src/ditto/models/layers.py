"""Building blocks shared by every family: RMSNorm, rotary embeddings, gated MLP activations."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ditto.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight), in fp32, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (self.offset + self.weight.float())).to(x.dtype)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight)
        if self.scale != 1.0:
            x = x * torch.tensor(self.scale, dtype=x.dtype)  # Gemma rounds the scale to the weight dtype
        return x


class SiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class GELUTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": SiLU, "gelu_tanh": GELUTanh}


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (dim/2,) in fp32, with linear or llama3-style scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaling:
        return inv
    kind = scaling.get("type")
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_ctx / low, old_ctx / high
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


class Rotary(nn.Module):
    """Rotate-half RoPE; cos/sin tables cached in fp32 up to the model's context length."""

    def __init__(self, dim: int, theta: float, scaling: dict | None, max_position: int):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.max_position = max_position
        self._cos = self._sin = None

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < n:
            size = max(n, min(self.max_position, 4096))
            inv_freq = rope_inv_freq(self.dim, self.theta, self.scaling)
            freqs = torch.outer(torch.arange(size, dtype=torch.int64).float(), inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)  # (P, D)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (T, H, D), positions (T,) -> rotated x, same dtype."""
        cos, sin = self.tables(int(positions.max()) + 1)
        if x.dtype == torch.float32 and x.device.type == "cpu":
            from ditto.numerics.kernels import rowops

            return rowops.rope(x, positions, cos, sin)  # one C call for the ops below, the same bits
        cos = cos[positions].unsqueeze(1).to(x.dtype)  # (T, 1, D)
        sin = sin[positions].unsqueeze(1).to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def make_norm(cfg: ModelConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_eps, cfg.norm_offset)
