"""Reading a saved OpenAI-format response: per-choice logprobs, token ids and ditto's own extension.

A /v1/completions choice carries `logprobs: {tokens, token_logprobs, top_logprobs}`; a
/v1/chat/completions choice `logprobs: {content: [{token, logprob, top_logprobs: [{token,
logprob}]}]}`. Token ids come, in this order of preference, from the choice's `token_ids` (vLLM
with `return_token_ids`), from ditto's extension (`response.ditto.choices[i].token_ids`, with the
seed ditto drew and the prompt ids), or from logprob tokens named "token_id:<id>" (vLLM's and
ditto's `return_tokens_as_token_ids`). Otherwise the verifier re-tokenises the text.
"""

from __future__ import annotations

import math
import re

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


def float_or_none(x) -> float | None:
    if x is None:
        return None
    if isinstance(x, str) and x in ("-Infinity", "-inf"):
        return -math.inf
    return float(x)


def choice_logprobs(lp) -> tuple[tuple | None, tuple | None, tuple | None]:
    """(tokens, logprobs, top_logprobs) from a completions or chat `logprobs` object."""
    if not lp:
        return None, None, None
    if "content" in lp:  # chat completions
        items = lp["content"] or []
        tokens = tuple(it["token"] for it in items)
        lps = tuple(float_or_none(it.get("logprob")) for it in items)
        tops = tuple({t["token"]: float(t["logprob"]) for t in it.get("top_logprobs") or []} for it in items)
        return tokens, lps, (tops if any(tops) else None)
    tokens = tuple(lp.get("tokens") or ()) or None
    lps = tuple(float_or_none(x) for x in lp.get("token_logprobs") or ()) or None
    tops = lp.get("top_logprobs")
    tops = tuple({str(k): float(v) for k, v in (t or {}).items()} for t in tops) if tops else None
    return tokens, lps, tops


def ids_from_token_names(tokens: tuple[str, ...] | None) -> tuple[int, ...] | None:
    """The ids when every logprob token is named "token_id:<id>", else None."""
    if not tokens:
        return None
    ids = []
    for t in tokens:
        m = _TOKEN_ID.match(t) if isinstance(t, str) else None
        if m is None:
            return None
        ids.append(int(m.group(1)))
    return tuple(ids)


def ditto_choice(response: dict, choice: dict) -> tuple[int | None, list | None, list | None]:
    """(seed, prompt ids, output ids) from ditto's `ditto` extension of a response, for one choice."""
    ext = response.get("ditto")
    if not isinstance(ext, dict):
        return None, None, None
    index = choice.get("index", 0)
    rec = next((c for c in ext.get("choices") or [] if c.get("index") == index), {})
    prompts = ext.get("prompt_token_ids") or []
    k = rec.get("prompt_index", 0)
    prompt_ids = prompts[k] if isinstance(prompts, list) and 0 <= k < len(prompts) else None
    return ext.get("seed"), prompt_ids, rec.get("token_ids")


def request_prompt(request: dict, choice_index: int):
    """The prompt a choice answers: a batch of prompts (a list of strings or of id lists) gives each
    prompt `n` consecutive choices."""
    prompt = request.get("prompt")
    batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list)
    if not batch:
        return prompt
    n = int(request.get("n") or 1)
    return prompt[min(choice_index // n, len(prompt) - 1)]
