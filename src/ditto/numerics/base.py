"""Numerics modes: a registry of named ways to store weights and compute a built, loaded model.

A mode is applied *after* the model is constructed and its weights loaded
(``model = get_mode("w8a8").apply(model)``): it walks the module tree, replaces every
``nn.Linear`` (lm_head included) by the mode's linear, casts RMSNorm weights and makes the
embedding lookup return the mode's activation dtype. The model file never branches on the mode.

What each mode does to the pieces that are not linears:

* float modes (fp32/bf16/fp16): the embedding, norms and linears are cast in place
  (``param.data = param.data.to(dtype)``), so a tied lm_head keeps sharing the embedding's
  Parameter; nn.Linear stays nn.Linear.
* layercast: every weight is stored bf16 (the tied Parameter is cast once and still shared);
  the embedding lookup is upcast to fp32; norms upcast their bf16 weight (RMSNorm computes in
  fp32 anyway); linears upcast their weight per call.
* integer-weight modes (int8, w8a8, w4, mxint8): the embedding table stays floating point in the
  dtype it was loaded in (an int lookup table would only cost accuracy: a lookup does no
  arithmetic to speed up) and its lookup is cast to fp32; norms are fp32. lm_head is either kept
  float (``float_lm_head``: w8a8, w4*) and tied to the table, or quantised from the table, so
  with tied embeddings the model then holds the float table *and* a quantised copy (int8, mxint8).

Buffers (rotary tables etc.) are never touched.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ditto.config import KV_DTYPES
from ditto.models.layers import Embedding, RMSNorm

# modules whose import registers the built-in modes (imported lazily by get_mode / list_modes)
BUILTIN_MODULES = (
    "ditto.numerics.fp",
    "ditto.numerics.layercast",
    "ditto.numerics.llm_int8",
    "ditto.numerics.w8a8",
    "ditto.numerics.w4",
    "ditto.numerics.mxint8",
    "ditto.numerics.gguf_native",
    "ditto.numerics.integer_engine",
)

_MODES: dict[str, NumericsMode] = {}
_ORIGIN: dict[str, str] = {}  # mode name -> module that registered it (list_modes orders by it)
_builtins_loaded = False


class CastEmbedding(Embedding):
    """The model's Embedding, sharing its weight Parameter, whose lookup is cast to `act_dtype`.

    Used where the table's storage dtype differs from the activation dtype (layercast: bf16
    table, fp32 activations; integer modes loaded from a bf16 table). The embedding scale is
    rounded to the table's dtype as the original module does, then applied in `act_dtype`.
    """

    def __init__(self, src: Embedding, act_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.weight = src.weight  # same Parameter object: ties with lm_head survive
        self.scale = src.scale
        self.act_dtype = act_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight).to(self.act_dtype)
        if self.scale != 1.0:
            x = x * torch.tensor(self.scale, dtype=self.weight.dtype).to(self.act_dtype)
        return x

    def extra_repr(self) -> str:
        v, d = self.weight.shape
        return f"{v}, {d}, weight={self.weight.dtype}, act={self.act_dtype}"


def _cast_param_(p: nn.Parameter | None, dtype: torch.dtype) -> None:
    """Cast a Parameter in place (object identity kept, so sharing/tying survives)."""
    if p is not None and p.dtype != dtype and p.is_floating_point():
        p.data = p.data.to(dtype)


@dataclass(frozen=True)
class NumericsMode:
    """A named numerics mode.

    name: registry key. act_dtype: dtype of the hidden states the engine feeds and the embedding
    returns. weights: human-readable weight format. kv_dtype: default KV-cache precision
    ("fp32" | "bf16" | "fp16" | "int8"; EngineConfig.kv_dtype overrides it).
    embed_dtype: dtype the embedding table is cast to (None: kept as loaded).
    norm_dtype: dtype RMSNorm weights are stored in. can_be_batch_invariant: False for a mode whose
    rows depend on the batch by design (determinism 'auto' then settles on 'fast').
    Subclasses override `convert_linear`.
    """

    name: str
    act_dtype: torch.dtype
    weights: str
    kv_dtype: str
    embed_dtype: torch.dtype | None = None
    norm_dtype: torch.dtype = torch.float32
    description: str = ""
    float_lm_head: bool = False
    can_be_batch_invariant: bool = True  # False: a row's result depends on the batch by design (LLM.int8)

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype {self.kv_dtype!r} not in {tuple(KV_DTYPES)}")

    # ---- hooks
    def prepare(self, loaded, config):
        """The engine's bundle (ditto.numerics.Prepared) for `loaded` under EngineConfig `config`: by default
        the module swap below, the determinism level's kernels and a float or int8 KV cache."""
        from ditto.numerics import prepare_float

        return prepare_float(self, loaded, config)

    def convert_linear(self, linear: nn.Linear) -> nn.Module:
        """Return the module that replaces `linear` (may be `linear` itself, cast in place)."""
        raise NotImplementedError

    def keep_float_linear(self, linear: nn.Linear) -> nn.Module:
        """A linear left in floating point, sharing its weight Parameter (ties kept): as is when
        stored in act_dtype, else upcast per call (a bf16 table stays bf16 in memory)."""
        if linear.weight.dtype == self.act_dtype:
            return linear
        from ditto.numerics.layercast import LayerCastLinear

        return LayerCastLinear(linear, linear.weight.dtype)

    def convert_embedding(self, emb: nn.Module) -> nn.Module:
        if self.embed_dtype is not None:
            _cast_param_(emb.weight, self.embed_dtype)
        if isinstance(emb, Embedding) and emb.weight.dtype != self.act_dtype:
            return CastEmbedding(emb, self.act_dtype)
        return emb

    def convert_norm(self, norm: nn.Module) -> nn.Module:
        _cast_param_(norm.weight, self.norm_dtype)
        return norm

    # ---- driver
    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Convert `model` in place (module swap + in-place casts) and return it.

        Embeddings are converted before linears so that a tied lm_head sees the table in its
        final dtype (float modes keep the tie; integer modes quantise a copy). Sets
        ``model.numerics = self.name`` for manifests.
        """
        if isinstance(model, nn.Linear):
            return self.convert_linear(model)
        done: dict[int, nn.Module] = {}
        for kinds, fn in (
            ((Embedding, nn.Embedding), self.convert_embedding),
            ((RMSNorm,), self.convert_norm),
            ((nn.Linear,), self.convert_linear),
        ):
            for parent in list(model.modules()):
                for child_name, child in list(parent.named_children()):
                    if not isinstance(child, kinds):
                        continue
                    if id(child) not in done:
                        keep = self.float_lm_head and parent is model and child_name == "lm_head"
                        done[id(child)] = self.keep_float_linear(child) if keep else fn(child)
                    new = done[id(child)]
                    if new is not child:
                        setattr(parent, child_name, new)
        model.numerics = self.name
        return model


# ---------------------------------------------------------------- registry


def register(mode: NumericsMode, *, replace: bool = False) -> NumericsMode:
    """Add `mode` to the registry under mode.name (ValueError if taken, unless replace=True)."""
    if mode.name in _MODES and not replace:
        raise ValueError(f"numerics mode {mode.name!r} is already registered")
    _MODES[mode.name] = mode
    _ORIGIN[mode.name] = sys._getframe(1).f_globals.get("__name__", "")  # the module that registered it
    return mode


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)


def get_mode(name: str) -> NumericsMode:
    """The registered mode called `name`; ValueError listing the available names otherwise. Built-in
    modules are imported in order only until `name` is registered (fp32 does not import integer's)."""
    for mod in BUILTIN_MODULES:
        if name in _MODES:
            break
        importlib.import_module(mod)
    else:
        _load_builtins()
    try:
        return _MODES[name]
    except KeyError:
        raise ValueError(f"unknown numerics mode {name!r}; available: {', '.join(_MODES)}") from None


def list_modes() -> list[str]:
    """Names of all registered modes: the built-in ones in BUILTIN_MODULES order (whatever was imported first),
    each module's in its registration order, then any registered from elsewhere."""
    _load_builtins()
    rank = {mod: i for i, mod in enumerate(BUILTIN_MODULES)}
    return sorted(_MODES, key=lambda name: rank.get(_ORIGIN[name], len(rank)))
