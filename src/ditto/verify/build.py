"""Build receipts from engine outputs: `receipt_for(llm, request_output, completion, params)`.

The receipt records what the engine actually ran: the model digest (weights plus whatever the
numerics mode adds, `llm.model_digest`), the tokenizer digest, numerics mode and determinism level,
the full sampling record with the resolved seed and the sample index, prompt and output ids,
logprobs, Activation-DiFR fingerprints with their public seed and width when the request asked for
them, and the hardware and thread count. `extra` carries engine settings a verifier may want to
reproduce (KV-cache dtype, bundled model name, family).
"""

from __future__ import annotations

import contextlib

import torch

from ditto.loader.registry import bundled_name_of
from ditto.sampling import SamplingParams
from ditto.verify.activation_difr import DEFAULT_FINGERPRINT_SEED
from ditto.verify.receipt import Receipt, hardware_info

__all__ = ["model_digest", "params_from_record", "receipt_for"]


def _resolved_params(request_output, params: SamplingParams | None) -> SamplingParams:
    """The params actually used: the engine's record (seed resolved) wins over the caller's copy."""
    rec = (getattr(request_output, "metrics", None) or {}).get("sampling")
    if rec:
        used = params_from_record(rec)
        if params is not None and params.seed is not None and used.seed != params.seed:
            raise ValueError(f"params.seed={params.seed} but the engine sampled with seed={used.seed}")
        return used
    if params is None:
        raise ValueError("no sampling params: pass `params` or an output with metrics['sampling']")
    if not params.greedy and params.seed is None:
        seed = (getattr(request_output, "metrics", None) or {}).get("seed")
        if seed is None:
            raise ValueError("the sampling seed is unknown; generate with an explicit seed")
        params = params.replace(seed=int(seed))
    return params


def params_from_record(record: dict) -> SamplingParams:
    """SamplingParams from a `SamplingParams.record()` dict (receipts, manifests)."""
    from dataclasses import fields

    names = {f.name for f in fields(SamplingParams)} - {"extra"}
    kw = {k: v for k, v in record.items() if k in names}
    for key in ("stop", "stop_token_ids"):
        if key in kw and kw[key] is not None:
            kw[key] = tuple(kw[key])
    return SamplingParams(**kw)


def model_digest(llm) -> str:
    """`llm.model_digest`, computed once per LLM (it hashes the weight files)."""
    cached = getattr(llm, "_ditto_verify_digest", None)
    if cached is None:
        cached = llm.model_digest
        with contextlib.suppress(AttributeError):  # a slotted backend: recompute every time
            llm._ditto_verify_digest = cached
    return cached


def receipt_for(llm, request_output, completion, params: SamplingParams | None = None, sign_key=None) -> Receipt:
    """A sealed (and, given an Ed25519 private key as object/PEM/path, signed) receipt for one completion."""
    used = _resolved_params(request_output, params)
    info = {}
    try:
        info = llm.info()
    except Exception:  # noqa: BLE001 - info is descriptive only
        info = {}
    cfg = llm.config
    device = getattr(llm, "device", None) or "cpu"
    hw = hardware_info(str(device))
    hw["threads"] = torch.get_num_threads()
    fps = completion.fingerprints
    path = getattr(getattr(llm, "loaded", None), "path", None)
    extra = {
        # the bundled name lets a verifier on another machine find the model; else the file's own name
        "model_name": (bundled_name_of(path) if path else None)
        or info.get("model_name")
        or getattr(getattr(llm, "loaded", None), "name", ""),
        "family": info.get("family"),
        "kv_dtype": info.get("kv_dtype"),
        "threads": torch.get_num_threads(),
        "engine": {
            "block_size": cfg.block_size,
            "max_num_seqs": cfg.max_num_seqs,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "prefill_chunk": cfg.prefill_chunk,
            "prefix_caching": cfg.enable_prefix_caching,
        },
        "sampler": info.get("sampler"),
    }
    extra = {k: v for k, v in extra.items() if v is not None}
    receipt = Receipt.from_completion(
        request_output,
        completion,
        used,
        model=str(getattr(getattr(llm, "loaded", None), "path", "") or info.get("model", "")),
        model_digest=model_digest(llm),
        tokenizer_digest=str(getattr(llm.tokenizer, "digest", None) or info.get("tokenizer_digest") or ""),
        numerics=cfg.numerics,
        determinism=cfg.determinism,
        fingerprint_seed=DEFAULT_FINGERPRINT_SEED if fps else None,
        hardware=hw,
        extra=extra,
    )
    return receipt.seal(sign_key)
