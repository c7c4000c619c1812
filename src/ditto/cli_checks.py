"""Checks of command-line arguments and input files, run before any model is loaded.

Every `ditto` command calls these first, so a bad flag or file costs milliseconds, not a model
load. A failed check raises UsageError; `ditto` prints it as `ditto <command>: error: ...` and
exits with status 2, like argparse's own errors. Messages name the flag (or file and line) and
say what was expected.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ditto.sampling_params import SamplingParams

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_tokens", "stop")


class UsageError(ValueError):
    """A bad argument or input, found before any work started (exit status 2)."""


def flag(name: str) -> str:
    """The command-line spelling of a field name: max_tokens -> --max-tokens."""
    return "--" + name.replace("_", "-")


def sampling_params(args, **overrides) -> SamplingParams:
    """SamplingParams from the sampling flags present on `args` (plus `overrides`), or UsageError naming
    the flag. Fields a command does not expose keep the SamplingParams defaults."""
    kw = {k: getattr(args, k) for k in SAMPLING_FLAGS if hasattr(args, k)}
    if "stop" in kw:
        kw["stop"] = tuple(kw["stop"] or ())
    kw.update(overrides)
    try:
        return SamplingParams(**kw)
    except (TypeError, ValueError) as exc:
        name, _, rest = str(exc).partition(" ")
        if hasattr(args, name):  # "argument --top-p: must be in (0, 1], got 0.0"
            raise UsageError(f"argument {flag(name)}: {rest}") from None
        raise UsageError(str(exc)) from None


def check(ok: bool, name: str, rule: str, value) -> None:
    """UsageError `argument --name: must be <rule>, got <value>` unless ok."""
    if not ok:
        raise UsageError(f"argument {flag(name)}: must be {rule}, got {value!r}")


def positive(args, *names: str, allow_none: bool = True) -> None:
    """Each named integer argument is >= 1 (None allowed when `allow_none`)."""
    for name in names:
        value = getattr(args, name, None)
        if value is None and allow_none:
            continue
        check(isinstance(value, int) and value >= 1, name, "a positive integer", value)


def non_negative(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        check(value is None or value >= 0, name, ">= 0", value)


def positive_number(args, *names: str) -> None:
    """Each named float argument is finite and > 0 (None allowed)."""
    for name in names:
        value = getattr(args, name, None)
        check(value is None or (math.isfinite(value) and value > 0), name, "a positive number", value)


def engine(args) -> None:
    """The shared model/engine flags: numerics name, engine sizes, threads, device and the model itself."""
    from ditto.config import EngineConfig

    numerics = getattr(args, "numerics", None)
    if numerics is not None and "," not in str(numerics):
        known = numerics_names()
        check(numerics in known, "numerics", "one of " + ", ".join(known), numerics)
    positive(args, "threads", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk", "block_size")
    positive_number(args, "kv_cache_gb")
    device = getattr(args, "device", None)
    if device is not None:
        try:
            EngineConfig(device=device)
            from ditto.devices import resolve_device

            resolve_device(device)
        except ValueError as exc:
            raise UsageError(f"argument --device: {exc}") from None
    model(getattr(args, "model", None))


def numerics_names() -> list[str]:
    from ditto.numerics.base import list_modes

    return list_modes()


def model(spec: str | None) -> None:
    """The model exists: a bundled name that is installed, a .gguf file or an HF directory."""
    if spec is None:
        return
    from ditto.loader.registry import resolve_model

    try:
        path = resolve_model(spec)
    except (FileNotFoundError, ImportError) as exc:
        raise UsageError(f"argument --model: {exc}") from None
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"argument --model: {path} is a folder without config.json (expected an HF model folder)")


def input_file(path: str | None, name: str) -> Path | None:
    """An existing, readable file (or None when the flag was not given)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"argument {flag(name)}: {path}: no such file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"argument {flag(name)}: {path}: not readable")
    return p


def output_file(path: str | None, name: str, stdout_ok: bool = False) -> None:
    """A file that can be written: its folder exists and it is not itself a folder ('-' = stdout if allowed)."""
    if path is None or (stdout_ok and path == "-"):
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"argument {flag(name)}: {path} is a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"argument {flag(name)}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"argument {flag(name)}: folder {parent} is not writable")


def sign_key(path: str | None, name: str = "sign_key") -> None:
    """An Ed25519 private key in PEM (made by `ditto keygen`)."""
    p = input_file(path, name)
    if p is None:
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"argument {flag(name)}: {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"argument {flag(name)}: {path}: not an Ed25519 key (create one with `ditto keygen`)")


def prompt_text(parts: list[str] | None) -> str:
    """The prompt from the command line, else from stdin; an empty prompt is an error."""
    if parts:
        text = " ".join(parts)
    elif sys.stdin is None:
        raise UsageError('no prompt: give it as an argument or on stdin (ditto generate "What is 17 * 23?")')
    else:
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end it with ctrl-d)", file=sys.stderr)
        text = sys.stdin.read()
    if not text.strip():
        raise UsageError("the prompt is empty")
    return text


OPENAI_FLAGS = ("base_url", "api_key", "served_model")


def backend_flags(args) -> None:
    """--backend openai needs an http(s) --base-url; the server flags belong to that backend only."""
    backend = getattr(args, "backend", None)
    if backend is None:
        return
    if backend != "openai":
        for name in OPENAI_FLAGS:
            if getattr(args, name, None) is not None:
                raise UsageError(f"argument {flag(name)}: only for the openai backend (this run uses {backend})")
        return
    url = getattr(args, "base_url", None)
    if not url:
        raise UsageError("argument --base-url: --backend openai needs the server's URL, e.g. http://127.0.0.1:8000/v1")
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    check(parts.scheme in ("http", "https") and bool(parts.hostname), "base_url", "an http(s):// URL with a host", url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise UsageError(f"argument --base-url: bad port in {url!r}") from None
    served = getattr(args, "served_model", None)
    check(served is None or bool(served.strip()), "served_model", "a non-empty model id", served)
    positive(args, "max_concurrency")
    positive_number(args, "request_timeout")
