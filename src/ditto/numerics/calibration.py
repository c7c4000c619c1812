"""Calibration for the `integer` numerics mode: activation ranges from a short text, computed once.

`collect_stats(model, token_chunks)` runs the float model (fp32, a plain causal attention) over
a few token sequences and records, per layer, the absolute maxima that fix the integer formats:

  resid               max |x| of the residual stream (embedding and every block output)   scalar
  L{i}.attn_in        per-channel max |input_norm(x)|   (D,)   SmoothQuant factors for q/k/v
  L{i}.ffn_in         per-channel max |pre_ffn_norm(x)| (D,)   SmoothQuant factors for gate/up
  L{i}.q, L{i}.k      max |q_proj(x)|, max |k_proj(x)|                                   scalar
  L{i}.qn, L{i}.kn    max |q_norm(q)|, max |k_norm(k)| (qk-norm families, else = q, k)    scalar
  L{i}.v              per-channel max |v_proj(x)|   (Hkv*d,)   static int8 V-cache scales
  L{i}.o_in           max |attention output|                                             scalar
  L{i}.gate           max |gate_proj(x)|                                                 scalar
  L{i}.up             per-channel max |up_proj(x)| (I,)
  L{i}.h              per-channel max |act(gate) * up| (I,)     SmoothQuant factors for down_proj
  final               max |norm(x)| ; logits: max |logit|                                 scalar
  rope{j}.cos/.sin    int16 RoPE tables in Q1.14 for positions < rope_positions, one per distinct
                      (theta, scaling); rope_index (num_layers,) says which one a layer uses

`save_calibration` writes them (float64, plus the text's token count and a version) to a
safetensors file next to the model; its sha256 goes into the model digest
(`ditto.loader.digest.files_digest(paths, extra=calibration_digest(path).encode())`).
Everything the integer model uses at run time is derived from these numbers and the weights with
correctly rounded IEEE operations only (see ditto.numerics.integer), so the file pins it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

CALIBRATION_VERSION = "integer-calib-v1"


class CausalContext:
    """Float attention for calibration: one sequence, positions 0..T-1, causal (+ sliding window)."""

    def __init__(self, scale: float):
        self.scale = scale

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        t, h, d = q.shape
        g = h // k.shape[1]
        k = k.repeat_interleave(g, dim=1)  # (T, H, D)
        v = v.repeat_interleave(g, dim=1)
        s = torch.einsum("thd,shd->hts", q.float(), k.float()) * self.scale  # (H, T, S)
        pos = torch.arange(t)
        visible = pos[None, :] <= pos[:, None]
        if window is not None:
            visible &= pos[None, :] > pos[:, None] - window
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        return torch.einsum("hts,shd->thd", p, v.float()).to(q.dtype)  # (T, H, D)


def _amax(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    x = x.detach().double().abs()
    return x.reshape(-1, x.shape[-1]).amax(0) if per_channel else x.amax().reshape(1)


@torch.inference_mode()
def collect_stats(model, token_chunks: list[list[int]], rope_positions: int = 8192) -> dict[str, torch.Tensor]:
    """Run the float model over each chunk and return the running maxima described above."""
    stats: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor, per_channel: bool = False) -> None:
        m = _amax(x, per_channel)
        stats[name] = m if name not in stats else torch.maximum(stats[name], m)

    hooks = []

    def on_out(name, per_channel=False):
        return lambda mod, args, out: record(name, out, per_channel)

    def on_in(name, per_channel=False):
        return lambda mod, args, out: record(name, args[0], per_channel)

    hooks.append(model.embed.register_forward_hook(on_out("resid")))
    for i, blk in enumerate(model.layers):
        a, mlp = blk.attn, blk.mlp
        hooks += [
            blk.register_forward_hook(on_out("resid")),
            blk.input_norm.register_forward_hook(on_out(f"L{i}.attn_in", True)),
            blk.pre_ffn_norm.register_forward_hook(on_out(f"L{i}.ffn_in", True)),
            a.q_proj.register_forward_hook(on_out(f"L{i}.q")),
            a.k_proj.register_forward_hook(on_out(f"L{i}.k")),
            a.v_proj.register_forward_hook(on_out(f"L{i}.v", True)),
            a.o_proj.register_forward_hook(on_in(f"L{i}.o_in")),
            mlp.gate_proj.register_forward_hook(on_out(f"L{i}.gate")),
            mlp.up_proj.register_forward_hook(on_out(f"L{i}.up", True)),
            mlp.down_proj.register_forward_hook(on_in(f"L{i}.h", True)),
        ]
        if a.q_norm is not None:
            hooks += [
                a.q_norm.register_forward_hook(on_out(f"L{i}.qn")),
                a.k_norm.register_forward_hook(on_out(f"L{i}.kn")),
            ]
        for name, norm in (("post_attn", blk.post_attn_norm), ("post_ffn", blk.post_ffn_norm)):
            if norm is not None:
                hooks.append(norm.register_forward_hook(on_out(f"L{i}.{name}")))
    hooks.append(model.norm.register_forward_hook(on_out("final")))
    try:
        ctx = CausalContext(model.cfg.scale)
        n_tokens = 0
        for chunk in token_chunks:
            ids = torch.tensor(chunk, dtype=torch.long)
            hidden = model(ids, torch.arange(len(chunk)), ctx)
            record("logits", model.compute_logits(hidden))
            n_tokens += len(chunk)
    finally:
        for h in hooks:
            h.remove()
    for i, blk in enumerate(model.layers):
        if blk.attn.q_norm is None:
            stats[f"L{i}.qn"], stats[f"L{i}.kn"] = stats[f"L{i}.q"].clone(), stats[f"L{i}.k"].clone()
    stats["num_tokens"] = torch.tensor([float(n_tokens)], dtype=torch.float64)
    stats.update(rope_stats(model, rope_positions))
    return stats


def rope_stats(model, positions: int) -> dict[str, torch.Tensor]:
    """Integer RoPE tables (stored, because cos/sin of another libm may round differently)."""
    from ditto.models.layers import rope_inv_freq
    from ditto.numerics.kernels.integer_ops import rope_tables

    out: dict[str, torch.Tensor] = {}
    keys: list[tuple] = []
    index = []
    for blk in model.layers:
        rot = blk.attn.rotary
        key = (rot.dim, float(rot.theta), repr(rot.scaling))
        if key not in keys:
            keys.append(key)
            inv = rope_inv_freq(rot.dim, rot.theta, rot.scaling).double()  # fp32 values, exact in fp64
            cos, sin = rope_tables(inv, min(positions, rot.max_position))
            j = len(keys) - 1
            out[f"rope{j}.cos"], out[f"rope{j}.sin"] = cos.to(torch.int16), sin.to(torch.int16)
        index.append(keys.index(key))
    out["rope_index"] = torch.tensor(index, dtype=torch.int64)
    return out


def calibration_path(model_path: str | Path) -> Path:
    """Where the calibration of a model file (or directory) lives: next to it.

    Safetensors format, but not named *.safetensors: an HF directory's weights are its *.safetensors files.
    """
    p = Path(model_path)
    return (p / "ditto-integer-calibration.int-calib") if p.is_dir() else p.with_name(p.name + ".int-calib")


def save_calibration(path: str | Path, stats: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
    """Write the stats (floats as float64) with `meta` (str -> str, e.g. the weights' digest) and the version."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: (v if not v.is_floating_point() else v.double()).contiguous() for k, v in stats.items()}
    save_file(tensors, str(path), {**(meta or {}), "version": CALIBRATION_VERSION})
    return path


def load_calibration(path: str | Path, with_metadata: bool = False):
    """The stats of a calibration file; with_metadata=True returns (stats, metadata dict)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        version = meta.get("version")
        if version != CALIBRATION_VERSION:
            raise ValueError(f"{path}: calibration version {version!r}, expected {CALIBRATION_VERSION!r}; recalibrate")
        stats = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return (stats, meta) if with_metadata else stats


def calibration_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def default_calibration_ids(tokenizer_encode, text: str, chunk: int = 256) -> list[list[int]]:
    """Split the token ids of a calibration text into chunks of at most `chunk` tokens."""
    ids = list(tokenizer_encode(text))
    return [ids[i : i + chunk] for i in range(0, len(ids), chunk)]


__all__ = [
    "CALIBRATION_VERSION",
    "CausalContext",
    "calibration_digest",
    "calibration_path",
    "collect_stats",
    "default_calibration_ids",
    "load_calibration",
    "save_calibration",
]
