"""The trusted teacher-forced pass, shared by receipt and claim replay: scoring in chunks, the engine's
min_tokens mask, reference log-probabilities, the first divergent token, and the exact/consistent/
inconsistent decision."""

from __future__ import annotations

import numpy as np
import torch

from ditto.sampling import SamplingParams, mask_min_tokens
from ditto.verify.token_difr import TokenDifrResult
from ditto.verify.verdict import Thresholds


def _decode(llm, tok: int | None) -> str:
    if tok is None:
        return ""
    try:
        return llm.tokenizer.decode([int(tok)], skip_special_tokens=False)
    except TypeError:
        return llm.decode([int(tok)])
    except Exception:  # noqa: BLE001 - an out-of-vocabulary id
        return f"<id {tok}>"


def _mask_min_tokens(llm, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The engine forbids stop tokens before min_tokens; the same mask on the reference logits (T, V)."""
    return mask_min_tokens(logits, params, getattr(llm.engine, "stop_ids", ()))


def _divergence(llm, index: int, claimed_id: int, reference_id: int, margin: float) -> dict:
    """A divergent token: index, claimed/reference id and decoded text, margin."""
    return {
        "index": index,
        "claimed_id": claimed_id,
        "claimed_text": _decode(llm, claimed_id),
        "reference_id": reference_id,
        "reference_text": _decode(llm, reference_id),
        "margin": margin,
    }


def _first_divergence(llm, res: TokenDifrResult) -> dict | None:
    i = res.first_divergence
    if i is None:
        return None
    return _divergence(llm, i, res.claimed_ids[i], res.reference_ids[i], res.margins[i])


def _reference_logprobs(logits: torch.Tensor, ids: list[int]) -> np.ndarray:
    """Reference log-probability (float64) of each claimed token; ids past the vocabulary read its last entry."""
    ref_lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(ids).clamp(max=ref_lp.shape[1] - 1)
    return ref_lp[torch.arange(len(ids)), idx].double().numpy()


def _score_chunks(llm, pairs: list[tuple[list[int], list[int]]], chunk: int = 8):
    """llm.score_batch over (prompt ids, claimed ids) pairs in chunks (logits are C x V floats each)."""
    for lo in range(0, len(pairs), chunk):
        yield from llm.score_batch(pairs[lo : lo + chunk], keep_logits=True)


def _decide(res: TokenDifrResult, act: dict | None, th: Thresholds, token_threshold: float) -> tuple[str, str]:
    fp_exact = act is None or act["exact"]
    if res.exact and fp_exact:
        what = "every claimed token is exactly what the reference sampler picks"
        return "exact", what + (" and every fingerprint matches bit for bit" if act is not None else "")
    bad = []
    if res.score > token_threshold:
        bad.append(f"Token-DiFR score {res.score:.4g} > threshold {token_threshold:.4g}")
    if act is not None and act["mean"] > th.activation:
        bad.append(f"mean fingerprint distance {act['mean']:.4g} > threshold {th.activation:.4g}")
    if bad:
        return "inconsistent", "; ".join(bad)
    why = f"{res.n_tokens - res.n_exact} of {res.n_tokens} tokens differ from the reference sampler's"
    if act is not None and not act["exact"]:
        why += f"; fingerprints differ (mean distance {act['mean']:.3g})"
    return "consistent", why + ", within the thresholds (honest numerical noise)"
