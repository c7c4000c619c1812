"""Claims without receipts: what some endpoint says it generated, normalised for verification.

A claims file is JSONL: one JSON object per line; blank lines and lines starting with '#' are
skipped. Two shapes, mixable in one file (explicit fields win over derived ones):

flat (ditto's own claim format)::

    {"id": "q1",                                  # optional; default "line-N"
     "prompt": "text" | "prompt_token_ids": [ids] | "messages": [{"role", "content"}, ...],
     "output_text": "text" | "output_token_ids": [ids],   # ids win; text is re-tokenised
     "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0, "seed": 5, ...
                                                  # or nested under "sampling" / "sampling_params"
     "sample_index": 0,                           # which of n samples (ditto's noise coordinate)
     "logprobs": [floats],                        # optional: claimed log p(token) per output token
     "top_logprobs": [{"token": logprob}, ...],   # optional
     "sampler": "ditto" | "other",                # whose seed (default "ditto", see below)
     "model": "name", "meta": {...}}              # informational

    `messages` are rendered with the verifying model's chat template (generation prompt added).
    A claim without `temperature` was sampled at T = 1 (the OpenAI API's default), not greedy.

OpenAI (`ditto verify --from-openai` demands this shape)::

    {"request": <the /v1/completions or /v1/chat/completions request body>,
     "response": <the response it got>}

    One Claim per choice (choice.index is the sample index; a batch of prompts gives each prompt
    `n` consecutive choices). Text comes from `text` / `message.content`, logprobs from the
    completions (`logprobs.tokens / token_logprobs / top_logprobs`) or chat
    (`logprobs.content[i].token / logprob / top_logprobs`) shape, token ids from vLLM's
    `token_ids` / `prompt_token_ids`, ditto's `ditto` extension, or "token_id:<id>" logprob tokens
    (see ditto.verify.openai_claims).

The seed: Token-DiFR rebuilds ditto's counter-based Gumbel noise, so a seed is replayable only
when ditto sampled it (`sampler` "ditto": the flat default, and any response that carries ditto's
`ditto` extension). Another engine's seed drives another generator: its sampled claims are checked
by their logprobs and by how likely the claimed tokens are at the claimed temperature.
Sampling options ditto cannot replay (logit_bias, tools, response_format, ...) are listed in
`Claim.unsupported` instead of being dropped silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from ditto.sampling import SamplingParams
from ditto.verify.openai_claims import (
    choice_logprobs,
    ditto_choice,
    float_or_none,
    ids_from_token_names,
    request_prompt,
)


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
# other engines' sampling options at the value that switches them off (llama.cpp's server spells its
# penalties its own way): neutral there, flagged as unsupported at any other value
_OFF_VALUES = {"repeat_penalty": 1.0, "typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0, "mirostat": 0}
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
    sampler: str = "ditto"  # whose seed: "ditto" (counter-based noise, replayable) or another engine's
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
        if self.params.seed is not None and self.sampler == "ditto":
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
    unknown = {k for k in request if k not in _PARAM_NAMES | _NEUTRAL | _UNSUPPORTED}  # unknown: flag
    unsupported |= {k for k in unknown if k not in _OFF_VALUES or request[k] != _OFF_VALUES[k]}
    return SamplingParams(**kw), tuple(sorted(unsupported))


def _output(ch: dict) -> tuple[str | None, tuple | None, tuple | None, tuple | None, tuple | None]:
    """(text, output ids, logprob tokens, logprobs, top logprobs) of one choice or flat claim."""
    text = ch.get("text")
    if text is None and isinstance(ch.get("message"), dict):
        text = ch["message"].get("content")
    for key in ("output_text", "output", "completion"):
        if text is None and isinstance(ch.get(key), str):
            text = ch[key]
    out_ids = _ids(ch.get("output_token_ids", ch.get("token_ids")), "output token ids")
    lp = ch.get("logprobs")
    tokens, lps, tops = choice_logprobs(lp if isinstance(lp, dict) else None)
    if isinstance(lp, list):  # flat ditto form: a list of floats
        lps = tuple(float_or_none(x) for x in lp)
    if isinstance(ch.get("top_logprobs"), list):  # flat form: one {token: logprob} per output token
        tops = tuple({str(k): float(v) for k, v in (t or {}).items()} for t in ch["top_logprobs"])
    return text, out_ids, tokens, lps, tops


def parse_claim(obj: dict, line: int = 0, *, openai: bool = False) -> list[Claim]:
    """The claims in one JSON object (several for an OpenAI response with n > 1 choices).

    openai=True demands the {"request": ..., "response": ...} shape (`ditto verify --from-openai`).
    """
    if not isinstance(obj, dict):
        raise ClaimError(f"line {line}: a claim is a JSON object, got {type(obj).__name__}")
    try:
        request = obj.get("request") or {}
        response = obj.get("response")
        is_response = isinstance(response, dict) and "choices" in response
        if openai and not (isinstance(obj.get("request"), dict) and is_response):
            raise ValueError(
                'expected {"request": <the request body>, "response": <its /v1/completions or '
                "/v1/chat/completions response>}; got keys " + ", ".join(sorted(map(str, obj))[:8])
            )
        if not isinstance(request, dict):
            raise ValueError("request must be a JSON object (the request body)")
        source = {**request, **(obj.get("sampling") or obj.get("sampling_params") or {})}
        source.update({k: v for k, v in obj.items() if k in _PARAM_NAMES or k in _UNSUPPORTED})
        messages = obj.get("messages", request.get("messages"))
        model = obj.get("model", request.get("model"))
        base_id = str(obj.get("id", obj.get("request_id", f"line-{line}")))
        # ditto's flat format states ditto's seed; a response states one only when ditto served it
        sampler = obj.get("sampler")
        if is_response:
            choices = response["choices"]
            model = model or response.get("model")
            base_id = str(obj.get("id", response.get("id", base_id)))
            sampler = sampler or ("ditto" if isinstance(response.get("ditto"), dict) else "other")
        else:
            choices = [obj]
            sampler = sampler or "ditto"
        if not choices:
            raise ValueError("the response has no choices")
        claims = []
        for pos, ch in enumerate(choices):
            if not isinstance(ch, dict):
                raise ValueError(f"choice {pos} is not a JSON object")
            index = int(ch.get("sample_index", ch.get("index", pos)))
            text, out_ids, tokens, lps, tops = _output(ch)
            seed, ext_prompt, ext_ids = ditto_choice(response, ch) if is_response else (None, None, None)
            if out_ids is None:
                out_ids = _ids(ext_ids, "ditto.choices[].token_ids") or ids_from_token_names(tokens)
            if text is None and out_ids is None:
                raise ValueError("no output: give output_text / text / message.content or output_token_ids")
            prompt = obj.get("prompt", request_prompt(request, index))
            prompt_ids = obj.get("prompt_token_ids")
            if is_response:
                prompt_ids = ch.get("prompt_token_ids", prompt_ids)
                prompt_ids = prompt_ids if prompt_ids is not None else response.get("prompt_token_ids")
                prompt_ids = prompt_ids if prompt_ids is not None else ext_prompt
            if isinstance(prompt, list):  # OpenAI accepts token ids as the prompt
                prompt, prompt_ids = None, prompt_ids if prompt_ids is not None else prompt
            if prompt is None and prompt_ids is None and messages is None:
                raise ValueError("no prompt: give prompt, prompt_token_ids or messages (or the request)")
            n_out = len(out_ids) if out_ids else (len(lps) if lps else None)
            params, unsupported = _params(
                dict(source, seed=source.get("seed") if source.get("seed") is not None else seed), request, n_out
            )
            claims.append(
                Claim(
                    id=base_id if len(choices) == 1 else f"{base_id}/{index}",
                    params=params,
                    prompt=prompt,
                    prompt_token_ids=_ids(prompt_ids, "prompt token ids"),
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
                    sampler=str(sampler),
                    line=line,
                    meta=dict(obj.get("meta") or {}),
                )
            )
        return claims
    except ClaimError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise ClaimError(f"line {line}: {e}") from e


def parse_claims(lines: Iterable[str], errors: list[ClaimError] | None = None, *, openai: bool = False) -> list[Claim]:
    """Claims from JSONL text lines (blank lines and lines starting with '#' are skipped).

    A line that cannot be read raises ClaimError, unless `errors` is a list: then its error (naming
    the line) is appended there and every other line is still read.
    """
    claims = []
    for n, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ClaimError(f"line {n}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from e
            claims.extend(parse_claim(obj, n, openai=openai))
        except ClaimError as e:
            if errors is None:
                raise
            errors.append(e)
    return claims


def load_claims(
    path: str | os.PathLike, errors: list[ClaimError] | None = None, *, openai: bool = False
) -> list[Claim]:
    """Claims from a JSONL file (see parse_claims for `errors`)."""
    with open(Path(path), encoding="utf-8") as f:
        return parse_claims(f, errors, openai=openai)
