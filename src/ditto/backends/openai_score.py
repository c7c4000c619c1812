"""Teacher-forced scoring over an OpenAI-compatible server, in the mode the probe found.

`score_request(backend, ids)` asks for the logprobs of every token of `ids` given the ones before
it and returns them per position (position 0 has no context: None), with the argmax id at each
position when the server names it:
  echo / echo+1     `logprobs.token_logprobs` of the echoed prompt (echo+1: the one generated token
                    after the prompt is dropped); argmax ids from ditto's `prompt_top_ids` or from
                    top_logprobs keyed "token_id:<id>"
  prompt_logprobs   vLLM's per-position {token id: {logprob, rank}} list
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ditto.backends.openai_http import HttpError
from ditto.backends.openai_probe import score_body

if TYPE_CHECKING:
    from ditto.backends.openai import OpenAIBackend


class ScoringUnavailable(ValueError):
    """The server offers no way to get a prompt's logprobs (raised before any work starts)."""


def _id(name) -> int | None:
    s = str(name)
    return int(s[len("token_id:") :]) if s.startswith("token_id:") else None


def _echo(resp: dict, ids: list[int]) -> tuple[list, list | None]:
    choice = resp["choices"][0]
    lp = choice.get("logprobs") or {}
    lps = list(lp.get("token_logprobs") or [])
    ditto = resp.get("ditto") or {}
    tops = None
    dchoices = ditto.get("choices") or []
    if dchoices and isinstance(dchoices[0].get("prompt_top_ids"), list):
        tops = list(dchoices[0]["prompt_top_ids"])
    elif isinstance(lp.get("top_logprobs"), list):
        tops = []
        for d in lp["top_logprobs"]:
            keyed = {_id(k): v for k, v in (d or {}).items()}
            best = max(((v, k) for k, v in keyed.items() if k is not None), default=None)
            tops.append(best[1] if best else None)
    names = lp.get("tokens") or []
    echoed = [_id(t) for t in names[: len(ids)]]
    if None not in echoed and echoed != ids:
        raise HttpError(200, "the server echoed other token ids than the prompt's", resp)
    return lps, tops


def _prompt_logprobs(resp: dict, ids: list[int]) -> tuple[list, list | None]:
    choice = resp["choices"][0]
    rows = choice.get("prompt_logprobs") or resp.get("prompt_logprobs") or []
    lps: list = []
    tops: list = []
    for pos, row in enumerate(rows[: len(ids)]):
        if not row:
            lps.append(None)
            tops.append(None)
            continue
        entry = row.get(str(ids[pos])) or row.get(ids[pos]) or {}
        lps.append(entry.get("logprob"))
        ranked = [(v.get("rank", 1 << 30), int(k)) for k, v in row.items() if isinstance(v, dict)]
        tops.append(min(ranked)[1] if ranked else None)
    return lps, tops


def score_request(backend: OpenAIBackend, ids: list[int]) -> tuple[dict, list, list | None]:
    """(response, logprob per position of `ids`, argmax id per position or None)."""
    mode = backend.caps.scoring
    prompt = ids if backend.caps.prompt_ids else backend.decode(ids)
    body = score_body(backend.model, prompt, mode, backend.caps.token_id_names)
    resp, _ = backend.http.post("/completions", body)
    lps, tops = _prompt_logprobs(resp, ids) if mode == "prompt_logprobs" else _echo(resp, ids)
    if len(lps) < len(ids):
        raise HttpError(200, f"asked for the logprobs of {len(ids)} prompt tokens, got {len(lps)}", resp)
    if tops is not None and len(tops) < len(ids):
        tops = None
    return resp, lps, tops
