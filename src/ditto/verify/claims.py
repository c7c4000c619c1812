"""Claims without receipts: what some endpoint says it generated, normalised for verification.

One JSON object per line. Accepted shapes (mixable; explicit fields win over derived ones):

  ditto / flat:   {"id", "prompt" | "prompt_token_ids" | "messages", "output" | "output_text" |
                   "completion" | "text", "output_token_ids" | "token_ids", "sampling" | "sampling_params"
                   (or sampling keys at top level), "sample_index", "logprobs": [floats], "model"}
  OpenAI-style:   {"request": <request body>, "response": <completions or chat completions response>}
                  one Claim per choice (choice.index is the sample index). Logprobs are read from
                  completions (`logprobs.tokens / token_logprobs / top_logprobs`) and chat
                  (`logprobs.content[i].token / logprob / top_logprobs`); vLLM's `token_ids` and
                  `prompt_token_ids` are used when present.

Sampling options ditto cannot replay (logit_bias, tools, response_format, ...) are listed in
`Claim.unsupported` instead of being dropped silently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from ditto.sampling import SamplingParams


class ClaimError(ValueError):
    """A claim line that cannot be understood; the message names the line and the problem."""


_PARAM_NAMES = {f.name for f in fields(SamplingParams)} - {"extra", "logprobs"}
# request keys that do not change which tokens are sampled (any other unknown request key is
# reported in Claim.unsupported)
_NEUTRAL = frozenset(
    [
        "model",
        "prompt",
        "messages",
        "stream",
        "stream_options",
        "user",
        "echo",
        "suffix",
        "best_of",
        "logprobs",
        "top_logprobs",
        "max_completion_tokens",
        "metadata",
        "store",
        "service_tier",
        "return_token_ids",
        "return_tokens_as_token_ids",
        "prompt_logprobs",
        "request_id",
        "id",
        "parallel_tool_calls",
        "add_generation_prompt",
        "chat_template_kwargs",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
    ]
)
# request keys that change sampling in ways ditto does not replay
_UNSUPPORTED = frozenset(
    [
        "logit_bias",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
        "bad_words",
        "allowed_token_ids",
        "typical_p",
        "top_a",
        "tfs",
        "mirostat",
        "length_penalty",
        "use_beam_search",
        "prediction",
        "reasoning_effort",
    ]
)


@dataclass(frozen=True)
class Claim:
    id: str
    params: SamplingParams  # seed is None when the claim does not state one
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None  # chat claims: apply the model's chat template
    output_text: str | None = None
    output_token_ids: tuple[int, ...] | None = None
    sample_index: int = 0
    tokens: tuple[str, ...] | None = None  # token strings an endpoint returned with its logprobs
    logprobs: tuple[float | None, ...] | None = None  # claimed log p(token) per output token
    top_logprobs: tuple[dict[str, float], ...] | None = None
    model: str | None = None
    finish_reason: str | None = None
    unsupported: tuple[str, ...] = ()  # sampling options ditto cannot replay
    line: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def needs_tokenization(self) -> bool:
        """True when the output is only text: the verifier must tokenize it (prefer `tokens`)."""
        return self.output_token_ids is None

    @property
    def method(self) -> str:
        """The strongest check this claim allows: greedy | token_difr | logprobs | likelihood."""
        if self.params.greedy:
            return "greedy"
        if self.params.seed is not None:
            return "token_difr"
        if self.logprobs is not None:
            return "logprobs"
        return "likelihood"


def _ids(value, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ValueError(f"{what} must be a list of non-negative integers")
    return tuple(value)


def _float_or_none(x) -> float | None:
    if x is None:
        return None
    if isinstance(x, str) and x in ("-Infinity", "-inf"):
        return -math.inf
    return float(x)


def _params(source: dict, request: dict, n_out: int | None) -> tuple[SamplingParams, tuple[str, ...]]:
    kw = {k: source[k] for k in _PARAM_NAMES if k in source and source[k] is not None}
    if "max_tokens" not in kw and source.get("max_completion_tokens") is not None:
        kw["max_tokens"] = source["max_completion_tokens"]
    if "max_tokens" not in kw:
        kw["max_tokens"] = max(16, n_out or 0)
    lp = source.get("logprobs")
    if lp is True:
        kw["logprobs"] = int(source.get("top_logprobs") or 0)
    elif isinstance(lp, int) and not isinstance(lp, bool):
        kw["logprobs"] = lp
    for key in ("stop", "stop_token_ids"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    kw.pop("n", None)  # one Claim per sample; n does not change a sample's tokens
    kw.setdefault("temperature", 1.0)  # a request that names none got the OpenAI API's default, not ditto's
    unsupported = {k for k in source if k in _UNSUPPORTED and source[k] not in (None, {}, [], False)}
    unsupported |= {k for k in request if k not in _PARAM_NAMES | _NEUTRAL | _UNSUPPORTED}  # unknown: flag
    return SamplingParams(**kw), tuple(sorted(unsupported))


def _choice_logprobs(lp) -> tuple[tuple | None, tuple | None, tuple | None]:
    """(tokens, logprobs, top_logprobs) from a completions or chat `logprobs` object."""
    if not lp:
        return None, None, None
    if "content" in lp:  # chat completions
        items = lp["content"] or []
        tokens = tuple(it["token"] for it in items)
        lps = tuple(_float_or_none(it.get("logprob")) for it in items)
        tops = tuple({t["token"]: float(t["logprob"]) for t in it.get("top_logprobs") or []} for it in items)
        return tokens, lps, (tops if any(tops) else None)
    tokens = tuple(lp.get("tokens") or ()) or None
    lps = tuple(_float_or_none(x) for x in lp.get("token_logprobs") or ()) or None
    tops = lp.get("top_logprobs")
    tops = tuple({str(k): float(v) for k, v in (t or {}).items()} for t in tops) if tops else None
    return tokens, lps, tops


def parse_claim(obj: dict, line: int = 0) -> list[Claim]:
    """The claims in one JSON object (several for an OpenAI response with n > 1 choices)."""
    if not isinstance(obj, dict):
        raise ClaimError(f"line {line}: a claim is a JSON object, got {type(obj).__name__}")
    try:
        request = obj.get("request") or {}
        response = obj.get("response")
        source = {**request, **(obj.get("sampling") or obj.get("sampling_params") or {})}
        source.update({k: v for k, v in obj.items() if k in _PARAM_NAMES or k in _UNSUPPORTED})
        prompt = obj.get("prompt", request.get("prompt"))
        prompt_ids = obj.get("prompt_token_ids")
        if isinstance(prompt, list):  # OpenAI accepts token ids as the prompt
            prompt, prompt_ids = None, prompt_ids if prompt_ids is not None else prompt
        messages = obj.get("messages", request.get("messages"))
        model = obj.get("model", request.get("model"))
        base_id = str(obj.get("id", obj.get("request_id", f"line-{line}")))
        if isinstance(response, dict) and "choices" in response:
            choices = response["choices"]
            prompt_ids = prompt_ids if prompt_ids is not None else response.get("prompt_token_ids")
            model = model or response.get("model")
            base_id = str(obj.get("id", response.get("id", base_id)))
        else:
            choices = [obj]
        if not choices:
            raise ValueError("the response has no choices")
        claims = []
        for pos, ch in enumerate(choices):
            text = ch.get("text")
            if text is None and isinstance(ch.get("message"), dict):
                text = ch["message"].get("content")
            for key in ("output_text", "output", "completion"):
                if text is None and isinstance(ch.get(key), str):
                    text = ch[key]
            out_ids = _ids(ch.get("output_token_ids", ch.get("token_ids")), "output token ids")
            tokens, lps, tops = _choice_logprobs(ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None)
            if isinstance(ch.get("logprobs"), list):  # flat ditto form: a list of floats
                lps = tuple(_float_or_none(x) for x in ch["logprobs"])
            if text is None and out_ids is None:
                raise ValueError("no output: give output_text / text / message.content or output_token_ids")
            ch_prompt_ids = ch.get("prompt_token_ids", prompt_ids) if ch is not obj else prompt_ids
            if prompt is None and ch_prompt_ids is None and messages is None:
                raise ValueError("no prompt: give prompt, prompt_token_ids or messages")
            params, unsupported = _params(source, request, len(out_ids) if out_ids else (len(lps) if lps else None))
            index = int(ch.get("sample_index", ch.get("index", pos)))
            claims.append(
                Claim(
                    id=base_id if len(choices) == 1 else f"{base_id}/{index}",
                    params=params,
                    prompt=prompt,
                    prompt_token_ids=_ids(ch_prompt_ids, "prompt token ids"),
                    messages=tuple(messages) if messages is not None else None,
                    output_text=text,
                    output_token_ids=out_ids,
                    sample_index=index,
                    tokens=tokens,
                    logprobs=lps,
                    top_logprobs=tops,
                    model=model,
                    finish_reason=ch.get("finish_reason"),
                    unsupported=unsupported,
                    line=line,
                    meta=dict(obj.get("meta") or {}),
                )
            )
        return claims
    except ClaimError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ClaimError(f"line {line}: {e}") from e


def parse_claims(lines: Iterable[str]) -> list[Claim]:
    """Claims from JSONL text lines (blank lines and lines starting with '#' are skipped)."""
    claims = []
    for n, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ClaimError(f"line {n}: not valid JSON ({e.msg} at column {e.colno})") from e
        claims.extend(parse_claim(obj, n))
    return claims


def load_claims(path: str | os.PathLike) -> list[Claim]:
    """Claims from a JSONL file."""
    with open(Path(path), encoding="utf-8") as f:
        return parse_claims(f)
