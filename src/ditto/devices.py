"""Which torch device the engine runs on: names resolved once, with a clear error when absent."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when a GPU is visible) -> torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} asked for, but torch sees no CUDA GPU here "
                f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'no'}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; choose cpu, cuda, cuda:N or auto")
    return dev


def describe(dev: torch.device) -> str:
    """Human-readable name for manifests and receipts."""
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (cuda {torch.version.cuda})"
    return "cpu"
