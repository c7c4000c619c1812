"""Load a model (bundled name, .gguf file or HF directory) into a Decoder with its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ditto.config import ModelConfig
from ditto.loader import gguf as gguf_loader
from ditto.loader import safetensors_dir, tokenizer_cache
from ditto.loader.digest import files_digest
from ditto.loader.registry import resolve_model
from ditto.models.decoder import Decoder


@dataclass
class LoadedModel:
    model: Decoder
    config: ModelConfig
    tokenizer: object  # ditto.loader.tokenizer.Tokenizer
    path: Path
    format: str  # "gguf" | "hf"
    weight_files: list[Path]
    weight_types: dict[str, str]  # name -> stored type (e.g. Q4_1, F32, bfloat16)

    @property
    def digest(self) -> str:
        return files_digest(self.weight_files)

    @property
    def name(self) -> str:
        return self.path.stem if self.format == "gguf" else self.path.name


class WeightError(ValueError):
    """Weights that do not fit the architecture (missing, unexpected or mis-shaped)."""


def load(spec: str | Path, *, progress: bool = True, keep_blocks: bool = False) -> LoadedModel:
    """keep_blocks: leave a GGUF file's block-quantised weights undecoded (meta tensors in the model,
    the blocks reachable through each module's `gguf_source`): for numerics `gguf`, which computes on
    them, so nothing is dequantised at load. Other modes need the decoded model (the default)."""
    from ditto.loader.tokenizer import Tokenizer

    path = resolve_model(spec)
    if path.is_dir():
        cfg = safetensors_dir.config_from_hf(path)
        files = safetensors_dir.weight_files(path)
        weights = safetensors_dir.iter_hf_weights(path, cfg)
        total = None
        tokenizer = Tokenizer.from_hf_dir(path)
        fmt = "hf"
    else:
        gguf = gguf_loader.open_gguf(path)
        cfg = gguf_loader.config_from_gguf(gguf)
        files = [path]
        weights = gguf_loader.iter_gguf_weights(gguf, cfg, keep_blocks=keep_blocks)
        total = len(gguf.tensors)
        tokenizer = tokenizer_cache.from_gguf(gguf)  # built once per file, then read back
        fmt = "gguf"
    if not cfg.eos_token_ids and tokenizer.eos_id is not None:
        cfg = _with(cfg, eos_token_ids=(tokenizer.eos_id,))
    model, types = build(cfg, weights, total=total, progress=progress, label=path.name)
    if fmt == "gguf":
        # numerics modes may run a weight on the file's own blocks (numerics.gguf_native, numerics.w4)
        sources = gguf_loader.block_sources(gguf, cfg)
        if cfg.tie_embeddings and "embed.weight" in sources:
            sources["lm_head.weight"] = sources["embed.weight"]
        for name, source in sources.items():
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.gguf_source = source
            if isinstance(owner, torch.nn.Linear) and source.kind in ("Q4_0", "Q4_1"):
                owner.q4_source = source
    return LoadedModel(model, cfg, tokenizer, path, fmt, files, types)


def _with(cfg: ModelConfig, **changes) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def build(
    cfg: ModelConfig, weights, *, total: int | None = None, progress: bool = False, label: str = ""
) -> tuple[Decoder, dict]:
    """Construct the model on the meta device and assign every weight, checking names and shapes."""
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied lm_head appears once
    state: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("loading {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
        )
        bar.start()
        task = bar.add_task(label, total=total)
    try:
        for name, tensor, kind in weights:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: the embedding serves both
            if name not in expected:
                raise WeightError(f"unexpected weight {name!r} for a {cfg.family} model with {cfg.num_layers} layers")
            if tuple(tensor.shape) != tuple(expected[name]):
                raise WeightError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}")
            state[name] = tensor.float() if tensor.dtype != torch.float32 else tensor
            types[name] = kind
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightError(f"missing weights: {', '.join(missing[:5])}{more}")
    model.load_state_dict(state, assign=True, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.eval().requires_grad_(False)
    return model, types
