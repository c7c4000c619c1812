"""Configuration dataclasses: what a model is (ModelConfig) and how the engine runs it (EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
DETERMINISM_LEVELS = ("fast", "batch_invariant", "exact")
# what a run may ask for: a level, or "auto" = the level measured free where the engine runs (auto_determinism)
DETERMINISM_CHOICES = ("auto", *DETERMINISM_LEVELS)
EXACT_NUMERICS = "integer"  # the numerics mode of level `exact`: integer-only arithmetic end to end
# KV-cache precisions: the name EngineConfig.kv_dtype and the CLI take -> torch's dtype name (what LLM.info() records)
KV_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


def check_numerics(numerics: str, determinism: str) -> None:
    """The rule tying numerics to determinism: numerics 'integer' and determinism 'exact' go together.

    Only integer-only arithmetic gives the same bits on every machine, and the integer mode gives
    nothing less, so each implies the other. Raises ValueError for any other pairing.
    """
    if determinism == "auto":
        return
    if (numerics == EXACT_NUMERICS) != (determinism == "exact"):
        raise ValueError(
            f"numerics {numerics!r} with determinism {determinism!r}: numerics {EXACT_NUMERICS!r} and "
            "determinism 'exact' go together (one implies the other)"
        )


def resolve_numerics(numerics: str, determinism: str) -> str:
    """The numerics a run asked for under `determinism` uses: 'exact' brings numerics 'integer'."""
    return EXACT_NUMERICS if determinism == "exact" else numerics


def resolve_determinism(numerics: str, determinism: str) -> str:
    """The level `numerics` runs under when `determinism` is asked of it (or of several modes alike):
    numerics 'integer' always runs 'exact'; other modes fall back from 'exact' to 'batch_invariant'.
    'auto' stays 'auto' for other modes: the engine settles it once it knows its device."""
    if numerics == EXACT_NUMERICS:
        return "exact"
    return "batch_invariant" if determinism == "exact" else determinism


def auto_determinism(numerics: str, device_type: str) -> str:
    """The level 'auto' means for `numerics` on a device of `device_type` ('cpu' or 'cuda').

    integer -> exact (its only level). CPU -> batch_invariant: the fixed-order C kernels make it free
    there. benchmarks/results/cpu_kernels/determinism_overhead.txt measured it, batched, against 'fast':
    - faster for fp32 (1.44x), bf16 (1.15x), w8a8 (1.15x), w4 (1.07x), w4-asym (1.06x) and mxint8 (1.38x);
    - equal within noise for gguf, layercast and fp16.
    Single stream, engine_vs_peers run 6: fp32 2.5x, bf16 1.84x.
    A mode whose rows depend on the batch by design (LLM.int8: `can_be_batch_invariant` False) gets fast.
    CUDA -> fast: invariance still costs there (GPU issue #23).
    """
    if device_type == "cpu" and numerics != EXACT_NUMERICS:
        from ditto.numerics.base import get_mode

        if not get_mode(numerics).can_be_batch_invariant:
            return "fast"
    return resolve_determinism(numerics, "batch_invariant" if device_type == "cpu" else "fast")


def kv_dtype_name(name: str) -> str:
    """The KV-cache dtype name (a KV_DTYPES key) for either spelling: 'bf16' or torch's 'bfloat16'."""
    if name in KV_DTYPES:
        return name
    for short, torch_name in KV_DTYPES.items():
        if name == torch_name:
            return short
    raise ValueError(f"unknown KV-cache dtype {name!r}; choose {', '.join(KV_DTYPES)}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, read from GGUF metadata or HF config.json.

    One dataclass covers every supported family; the family flags below switch the few
    structural differences (qkv bias, q/k norm, Gemma's extra norms and scaled embeddings).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # Gemma 3 sliding layers use their own base
    rope_scaling: dict | None = None  # {"type": "linear"|"llama3"|..., "factor": ...}
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False  # Gemma: post-attention and post-ffn norms
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (offset + weight)
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    activation: str = "silu"  # "silu" or "gelu_tanh"
    attn_scale: float | None = None  # None -> head_dim ** -0.5
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default=())  # per layer "full" or "sliding"
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def window(self, layer: int) -> int | None:
        """Sliding-window size of a layer (None for full attention)."""
        return self.sliding_window if self.layer_types[layer] == "sliding" else None


@dataclass(frozen=True)
class EngineConfig:
    """How the engine schedules and stores work. CLI defaults are read from here."""

    numerics: str = "fp32"
    determinism: str = "auto"  # a level, or "auto": settled by the engine for its device (auto_determinism)
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # None -> sized from kv_cache_gb
    kv_cache_gb: float = 2.0
    kv_dtype: str | None = None  # a KV_DTYPES name (torch spellings accepted); None -> follows numerics
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 2048  # token budget per step
    prefill_chunk: int = 512  # longest prefill piece of one sequence in one step
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None -> model's context window
    threads: int | None = None  # None -> torch default
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (cuda when available)

    def __post_init__(self) -> None:
        if self.determinism not in DETERMINISM_CHOICES:
            raise ValueError(
                f"unknown determinism level {self.determinism!r}; choose one of {', '.join(DETERMINISM_CHOICES)}"
            )
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be positive")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose cpu, cuda, cuda:N or auto")
        check_numerics(self.numerics, self.determinism)
        if self.kv_dtype is not None:
            object.__setattr__(self, "kv_dtype", kv_dtype_name(self.kv_dtype))
