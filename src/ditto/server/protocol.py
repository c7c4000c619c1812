"""OpenAI wire protocol: request and response models, the error shape, sampling-parameter mapping.

Requests are validated strictly (no "1" -> 1 coercion, unknown fields rejected) so a typo or a
wrong type is a 400 that names the field, never a silently different sample. Responses carry
one extra field, `ditto`, with what makes the output checkable (seed, token ids, receipt ids).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ditto.sampling import DEFAULTS, SamplingParams

MAX_N = 64
MAX_STOP = 16


class ApiError(Exception):
    """An error the client caused (or a server condition it must see); rendered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Sampling fields shared by /v1/completions and /v1/chat/completions (OpenAI + ditto/vLLM extras)."""

    model: str
    n: int = 1
    max_tokens: int | None = None  # None: ditto's default (SamplingParams().max_tokens), capped at the room left
    temperature: float = DEFAULTS.temperature  # 0: greedy, as everywhere in ditto (README, "Defaults")
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh seed, returned in `ditto.seed` and the receipt
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # ditto / vLLM extensions
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    fingerprint_k: Literal[0, 8, 16, 32] = 0
    ditto_receipt: bool = False  # also return the full receipts inline (ids are always returned)
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:<id>", not by text
    # accepted only at their neutral values (anything else changes sampling in ways ditto does not do)
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False  # scoring only (max_tokens 0): the prompt's logprobs, see ditto.server.echo
    suffix: str | None = None


class ContentPart(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True


class VerifyRequest(_Strict):
    receipt: dict | None = None  # a receipt document (as served by /v1/receipts/{id} or written by ditto)
    receipt_id: str | None = None  # ...or the id of a receipt this server issued
    public_key: str | None = None  # require a signature by this Ed25519 key (hex or PEM)
    threshold: float | None = None  # Token-DiFR score up to which a non-exact replay is `consistent`
    # (None: ditto.verify.replay.DEFAULT_TOKEN_THRESHOLD)


# ---- responses ------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    ditto: dict[str, Any]


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    ditto: dict[str, Any]


# ---- mapping --------------------------------------------------------------------------------


def sampling_params(req: _SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams for one request (seed resolved, so it can be reported and put in receipts)."""
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported by ditto (it would not be replayable)", param="logit_bias")
    if req.best_of not in (None, req.n):
        raise ApiError(400, "best_of is not supported (use n and pick client-side)", param="best_of")
    if not 1 <= req.n <= MAX_N:
        raise ApiError(400, f"n must be in [1, {MAX_N}], got {req.n}", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop strings", param="stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must be non-empty", param="stop")
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise ApiError(400, f"logprobs / top_logprobs must be in [0, 20], got {logprobs}", param="logprobs")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise ApiError(400, "seed must be in [0, 2^63)", param="seed")
    try:
        params = SamplingParams(
            n=req.n,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            fingerprint_k=req.fingerprint_k,
        )
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param=param if param in type(req).model_fields else None) from e
    return params.with_seed()
