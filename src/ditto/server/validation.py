"""Request checks for the HTTP API: body reading (size, UTF-8, strict JSON), pydantic parsing into
OpenAI-shaped errors, model name, prompt shapes and lengths against the context window."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastapi import Request
from pydantic import ValidationError

from ditto.server.protocol import (
    ApiError,
)

if TYPE_CHECKING:
    from ditto.server.state import ServerState


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 when over `limit`, 400 for bad UTF-8, bad JSON or a non-object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {length} bytes; the limit is {limit}", code="body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})") from e

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_unicode(obj)
    return obj


def check_unicode(obj, where: str = "body") -> None:
    """JSON may escape lone surrogates (\\ud800) that are not Unicode text; refuse them early."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{where} contains invalid Unicode (a lone surrogate)", param=where) from e
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_unicode(k, where)
            check_unicode(v, k if where == "body" else where)
    elif isinstance(obj, list):
        for v in obj:
            check_unicode(v, where)


def parse_body(model, obj: dict):
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise ApiError(400, f"{loc}: {err['msg']}{more}", param=loc or None) from e


def check_model(st: ServerState, name: str) -> None:
    if name not in st.aliases:
        raise ApiError(
            404,
            f"model {name!r} is not served here; this server serves {st.name!r}",
            param="model",
            code="model_not_found",
        )


def completion_prompts(st: ServerState, prompt) -> list[tuple[str | None, list[int]]]:
    single = isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt))
    items = [prompt] if single else list(prompt)
    if not items:
        raise ApiError(400, "prompt is empty", param="prompt")
    if len(items) > 64:
        raise ApiError(400, "at most 64 prompts per request", param="prompt")
    out = []
    for p in items:
        out.append((p, st.llm.encode(p)) if isinstance(p, str) else (None, list(p)))
    check_prompts(st, out)
    return out


def check_prompts(st: ServerState, prompts) -> None:
    for _, ids in prompts:
        if not ids:
            raise ApiError(400, "prompt is empty: give at least one token", param="prompt")
        bad = next((t for t in ids if not 0 <= t < st.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (size {st.vocab_size})", param="prompt")
        if len(ids) >= st.max_model_len:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens but the context window is {st.max_model_len}; shorten it",
                param="prompt",
                code="context_length_exceeded",
            )


def max_tokens_for(st: ServerState, requested: int | None, prompts) -> int:
    """The request's max_tokens; when it names none, ditto's default capped at the context room left."""
    longest = max(len(ids) for _, ids in prompts)
    room = st.max_model_len - longest
    if requested is None:
        from ditto.sampling import SamplingParams

        return min(SamplingParams().max_tokens, room)
    if requested < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {requested}", param="max_tokens")
    if requested > room:
        raise ApiError(
            400,
            f"max_tokens={requested} does not fit: the prompt has {longest} tokens and the context window is "
            f"{st.max_model_len} (at most {room} new tokens)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def message_dict(i: int, m) -> dict:
    content = m.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            parts.append(part.text)
        content = "".join(parts)
    msg = {"role": m.role, "content": content or ""}
    if m.name is not None:
        msg["name"] = m.name
    return msg
