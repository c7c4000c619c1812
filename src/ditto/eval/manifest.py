"""Run manifests: the whole inference stack of an evaluation run, written to manifest.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

MANIFEST_VERSION = 1

# config fields that may change between a run and its resumption without changing any result
RESUME_FREE_FIELDS = ("limit", "batch_problems", "grader_workers", "grader_timeout", "progress")
# config fields added later, left out of the key at their default so that older runs still resume
_KEY_IF_NOT_DEFAULT = {"keep_tokens": False}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in (
        "ditto",
        "torch",
        "numpy",
        "transformers",
        "tokenizers",
        "math-verify",
        "sympy",
        "matplotlib",
        "llama_cpp_python",
    ):
        v = _version(dist)
        if v is not None:
            out[dist] = v
    return out


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware() -> dict:
    hw: dict = {
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "sched_getaffinity"):
        hw["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                hw["memory_kib"] = int(line.split()[1])
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            hw["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return hw


def threads() -> dict:
    out = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    try:
        import torch

        out["torch_num_threads"] = torch.get_num_threads()
        out["torch_num_interop_threads"] = torch.get_num_interop_threads()
    except Exception:  # noqa: BLE001
        pass
    return out


def resume_key(config: dict, backend_info: dict, prompt_record: dict) -> str:
    """Hash of everything that must be identical for a resumed run to continue the same experiment."""
    cfg = {k: v for k, v in config.items() if k not in RESUME_FREE_FIELDS}
    cfg = {k: v for k, v in cfg.items() if k not in _KEY_IF_NOT_DEFAULT or v != _KEY_IF_NOT_DEFAULT[k]}
    ident = {
        "config": cfg,
        "model_digest": backend_info.get("model_digest"),
        "backend": backend_info.get("backend"),
        "prompt": prompt_record.get("sha256"),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def build_manifest(
    *,
    config: dict,
    backend_info: dict,
    task_info: dict,
    prompt_record: dict,
    sampling: dict,
    seed_rule: str,
    grader: dict,
    problems: list[str],
    batch: dict,
) -> dict:
    ids_hash = hashlib.sha256("\n".join(problems).encode()).hexdigest()
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": "ditto-eval",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config": config,
        "resume_key": resume_key(config, backend_info, prompt_record),
        "backend": backend_info,
        "task": task_info | {"problems": len(problems), "problem_ids_sha256": ids_hash},
        "prompt_template": prompt_record,
        "sampling": sampling,
        "seed_rule": seed_rule,
        "grader": grader,
        "batch_limits": batch,
        "versions": versions(),
        "hardware": hardware(),
        "threads": threads(),
        "sessions": [],
    }


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
