"""`ditto serve`: an OpenAI-compatible HTTP API over one shared engine loop, with receipts.

Endpoints
  GET  /v1/models                 the one served model (+ `ditto`: numerics, determinism, digests, engine)
  POST /v1/completions            prompt: str | [str] | [int] | [[int]]; stream, n, seed, logprobs (0-20), stop,
                                  max_tokens (default 16), temperature, top_p, presence/frequency_penalty
  POST /v1/chat/completions       messages (text content); logprobs + top_logprobs; max_tokens or
                                  max_completion_tokens (default: the rest of the context window)
  GET  /v1/receipts/{id}          a receipt this server issued (canonical JSON)
  POST /v1/verify                 {"receipt": {...}} or {"receipt_id": "..."}, optional "public_key",
                                  "threshold": replays it (ditto.verify.replay) on this server's model ->
                                  {"verdict": exact | consistent | inconsistent | unverifiable, ...}
  GET  /health, GET /metrics      liveness; Prometheus text (requests, tokens, queue depth, running
                                  sequences, KV blocks, latency and time-to-first-token histograms)

ditto extensions accepted in both generation bodies: top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, skip_special_tokens, include_stop_str_in_output, fingerprint_k
(Activation-DiFR fingerprints in the receipt) and ditto_receipt (inline the receipts). Unknown
fields are a 400 (a misspelt sampling option must not silently change nothing); logit_bias and
best_of != n are refused because they would not be replayable. A request without `seed` gets a
random one, reported back.

Every response carries `ditto`: {seed, determinism, numerics, model_digest, prompt_token_ids (one
list per prompt), choices: [{index, prompt_index, token_ids, receipt_id[, receipt]}]}. Streaming
chunks carry `ditto.token_ids` (the ids behind that chunk's text) and, on the chunk with a
finish_reason, the same per-choice record. One sealed receipt per choice (Ed25519-signed with
--sign-key) is kept in memory (newest `max_receipts`) and served at /v1/receipts/{id}.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON,
bad UTF-8, wrong types, out-of-range sampling values or a prompt / max_tokens over the context
window; 401 bad API key; 404 unknown model or receipt; 413 oversized body; 429 when more than
`max_queue` requests wait for a slot. With an API key every /v1 route needs
`Authorization: Bearer <key>`; /health and /metrics stay open. The key is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
import uuid
from collections import OrderedDict

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditto.outputs import CompletionOutput, RequestOutput
from ditto.sampling import SamplingParams
from ditto.server.engine_loop import Delta, EngineLoop, Metrics, QueueFull
from ditto.server.protocol import (
    ApiError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    VerifyRequest,
    error_body,
    sampling_params,
)
from ditto.verify.receipt import Receipt, hardware_info, load_private_key

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class ServerState:
    def __init__(self, llm, served_name, api_key, sign_key, max_queue, max_body_bytes, max_receipts):
        self.llm = llm
        self.name = served_name or llm.loaded.name
        self.aliases = {self.name, llm.loaded.name, str(llm.loaded.path)}
        self.api_key = api_key or None
        self.sign_key = load_private_key(sign_key) if sign_key else None
        self.max_body_bytes = max_body_bytes
        self.max_receipts = max_receipts
        self.receipts: OrderedDict[str, Receipt] = OrderedDict()
        self.metrics = Metrics()
        self.loop = EngineLoop(llm, max_queue=max_queue, metrics=self.metrics)
        self.model_digest = llm.model_digest
        self.tokenizer_digest = getattr(llm.tokenizer, "digest", "") or ""
        self.hardware = hardware_info()
        self.max_model_len = llm.engine.max_model_len
        self.vocab_size = llm.loaded.config.vocab_size
        self.created = int(time.time())
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        p = self._pieces.get(token_id)
        if p is None:
            p = self._pieces[token_id] = self.llm.tokenizer.decode([token_id], skip_special_tokens=False)
        return p

    def store(self, receipt: Receipt) -> str:
        rid = receipt.content_hash.removeprefix("sha256:")
        self.receipts[rid] = receipt
        while len(self.receipts) > self.max_receipts:
            self.receipts.popitem(last=False)
        return rid


def create_app(
    llm,
    *,
    served_name: str | None = None,
    api_key: str | None = None,
    sign_key=None,
    max_queue: int = 1024,
    max_body_bytes: int = 4 << 20,
    max_receipts: int = 10_000,
) -> FastAPI:
    """The ASGI app. The engine thread starts with the app's lifespan and stops with it."""
    st = ServerState(llm, served_name, api_key, sign_key, max_queue, max_body_bytes, max_receipts)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        st.loop.start()
        try:
            yield
        finally:
            st.loop.stop()

    app = FastAPI(title="ditto", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ditto = st
    app.add_middleware(MetricsMiddleware, metrics=st.metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(error_body(str(exc.errors()[:3])), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request, exc):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    async def auth(request: Request) -> None:
        if st.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), st.api_key.encode()):
            raise ApiError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    guarded = [Depends(auth)]

    @app.get("/health")
    async def health():
        ok = st.loop.alive
        body = {"status": "ok" if ok else "engine loop stopped", "model": st.name, "queue_depth": st.loop.waiting}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        info = st.llm.info()
        card = {"id": st.name, "object": "model", "created": st.created, "owned_by": "ditto", "ditto": info}
        card["max_model_len"] = st.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/v1/receipts/{receipt_id}", dependencies=guarded)
    async def get_receipt(receipt_id: str):
        receipt = st.receipts.get(receipt_id.removeprefix("sha256:"))
        if receipt is None:
            raise ApiError(404, f"no receipt {receipt_id!r} on this server", "not_found_error", "receipt_id")
        return Response(receipt.to_json(), media_type="application/json")

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        body = _parse(CompletionRequest, await _read_json(request, st.max_body_bytes))
        _check_model(st, body.model)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        prompts = _completion_prompts(st, body.prompt)
        max_tokens = _max_tokens(st, body.max_tokens if body.max_tokens is not None else 16, prompts)
        params = sampling_params(body, max_tokens, body.logprobs)
        return await _generate(request, st, "completion", body, prompts, params)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        body = _parse(ChatCompletionRequest, await _read_json(request, st.max_body_bytes))
        _check_model(st, body.model)
        messages = [_message_dict(i, m) for i, m in enumerate(body.messages)]
        try:
            ids = st.llm.tokenizer.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
        except ValueError as e:
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from e
        prompts = [(None, ids)]
        _check_prompts(st, prompts)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = _max_tokens(st, requested, prompts)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens, logprobs)
        return await _generate(request, st, "chat", body, prompts, params)

    @app.post("/v1/verify", dependencies=guarded)
    async def verify(request: Request):
        body = _parse(VerifyRequest, await _read_json(request, st.max_body_bytes))
        if (body.receipt is None) == (body.receipt_id is None):
            raise ApiError(400, "give exactly one of 'receipt' (a receipt document) or 'receipt_id'", param="receipt")
        if body.receipt is not None:
            try:
                receipt = Receipt.from_json(json.dumps(body.receipt))
            except (ValueError, TypeError) as e:
                raise ApiError(400, f"not a valid receipt: {e}", param="receipt") from e
        else:
            receipt = st.receipts.get(body.receipt_id.removeprefix("sha256:"))
            if receipt is None:
                raise ApiError(404, f"no receipt {body.receipt_id!r} on this server", "not_found_error", "receipt_id")
        if body.threshold is not None and not (math.isfinite(body.threshold) and body.threshold >= 0):
            raise ApiError(400, "threshold must be a finite number >= 0", param="threshold")
        from ditto.verify.replay import ModelMismatchError, verify_receipt

        fut = st.loop.call(lambda llm: verify_receipt(llm, receipt, body.threshold, body.public_key))
        try:
            v = await asyncio.wrap_future(fut)
        except ModelMismatchError as e:
            return {"verdict": "unverifiable", "status": "unverifiable", "reason": str(e), "id": receipt.content_hash}
        except ValueError as e:
            raise ApiError(400, f"cannot replay this receipt: {e}", param="receipt") from e
        server = {"model": st.name, "model_digest": st.model_digest, "numerics": st.llm.config.numerics}
        return {"verdict": v.status, **v.to_dict(), "server": server}

    return app


# ---- request parsing ------------------------------------------------------------------------


async def _read_json(request: Request, limit: int) -> dict:
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
    _check_unicode(obj)
    return obj


def _check_unicode(obj, where: str = "body") -> None:
    """JSON may escape lone surrogates (\\ud800) that are not Unicode text; refuse them early."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{where} contains invalid Unicode (a lone surrogate)", param=where) from e
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_unicode(k, where)
            _check_unicode(v, k if where == "body" else where)
    elif isinstance(obj, list):
        for v in obj:
            _check_unicode(v, where)


def _parse(model, obj: dict):
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise ApiError(400, f"{loc}: {err['msg']}{more}", param=loc or None) from e


def _check_model(st: ServerState, name: str) -> None:
    if name not in st.aliases:
        raise ApiError(
            404,
            f"model {name!r} is not served here; this server serves {st.name!r}",
            param="model",
            code="model_not_found",
        )


def _completion_prompts(st: ServerState, prompt) -> list[tuple[str | None, list[int]]]:
    single = isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt))
    items = [prompt] if single else list(prompt)
    if not items:
        raise ApiError(400, "prompt is empty", param="prompt")
    if len(items) > 64:
        raise ApiError(400, "at most 64 prompts per request", param="prompt")
    out = []
    for p in items:
        out.append((p, st.llm.encode(p)) if isinstance(p, str) else (None, list(p)))
    _check_prompts(st, out)
    return out


def _check_prompts(st: ServerState, prompts) -> None:
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


def _max_tokens(st: ServerState, requested: int | None, prompts) -> int:
    longest = max(len(ids) for _, ids in prompts)
    room = st.max_model_len - longest
    if requested is None:
        return room
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


def _message_dict(i: int, m) -> dict:
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


# ---- generation -----------------------------------------------------------------------------


class _Choice:
    """One choice (one sample of one prompt) as it is assembled from engine deltas."""

    def __init__(self, index: int, prompt_index: int, sample_index: int):
        self.index, self.prompt_index, self.sample_index = index, prompt_index, sample_index
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[dict[int, float]] = []
        self.fingerprints: list[list[float]] = []
        self.finish_reason = self.stop_reason = self.final_text = None
        self.sent = ""
        self.receipt: Receipt | None = None
        self.receipt_id: str | None = None

    def add(self, d: Delta) -> None:
        self.ids += d.token_ids
        self.logprobs += d.logprobs
        self.tops += d.top_logprobs
        self.fingerprints += d.fingerprints
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.final_text = d.finish_reason, d.stop_reason, d.text

    def text(self, tokenizer, params: SamplingParams) -> str:
        if self.final_text is not None:
            return self.final_text
        return tokenizer.decode(self.ids, skip_special_tokens=params.skip_special_tokens)

    def take_text(self, tokenizer, params: SamplingParams) -> str:
        """New text since the last call. Until the end it holds back an incomplete UTF-8 character and
        the last len(longest stop string) - 1 characters, which could still turn into a stop string."""
        text = self.text(tokenizer, params)
        if self.finish_reason is None:
            text = text.rstrip("\ufffd")
            if params.stop:
                text = text[: max(0, len(text) - (max(len(s) for s in params.stop) - 1))]
            if len(text) <= len(self.sent) or not text.startswith(self.sent):
                return ""
        delta = text[len(self.sent) :]
        self.sent = text
        return delta


def _clean(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _logprobs(st: ServerState, kind: str, c: _Choice, start: int, end: int, want_top: bool, offset: int = 0):
    ids, lps, tops = c.ids[start:end], c.logprobs[start:end], c.tops[start:end]
    if kind == "chat":
        content = []
        for i, tok in enumerate(ids):
            piece = st.piece(tok)
            top = []
            if want_top and i < len(tops):
                top = [
                    {"token": st.piece(t), "logprob": _clean(v), "bytes": list(st.piece(t).encode())}
                    for t, v in tops[i].items()
                ]
            content.append(
                {"token": piece, "logprob": _clean(lps[i]), "bytes": list(piece.encode()), "top_logprobs": top}
            )
        return {"content": content}
    tokens = [st.piece(t) for t in ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = None
    if want_top:
        top = [_top_dict(st, tops[i]) if i < len(tops) else {} for i in range(len(ids))]
    return {"tokens": tokens, "token_logprobs": [_clean(x) for x in lps], "top_logprobs": top, "text_offset": offsets}


def _top_dict(st: ServerState, top: dict[int, float]) -> dict[str, float]:
    """OpenAI's completions format keys top logprobs by token text; two ids with the same text (e.g.
    partial UTF-8 bytes) would collide, so a repeat is keyed "token_id:<id>" instead."""
    out: dict[str, float] = {}
    for t, v in top.items():
        key = st.piece(t)
        out[key if key not in out else f"token_id:{t}"] = _clean(v)
    return out


def _receipt(st: ServerState, prompt_ids, c: _Choice, params: SamplingParams, rid: str) -> Receipt:
    """The same receipt `ditto generate --receipt` writes (ditto.verify.build), sealed and maybe signed."""
    from ditto.verify.build import receipt_for

    out = RequestOutput(rid, None, list(prompt_ids), [], True, {"sampling": params.record()})
    comp = CompletionOutput(
        index=c.sample_index,
        text="",
        token_ids=c.ids,
        logprobs=c.logprobs,
        finish_reason=c.finish_reason,
        fingerprints=c.fingerprints or None,
        stop_reason=c.stop_reason,
    )
    return receipt_for(st.llm, out, comp, params, sign_key=st.sign_key)


def _ditto_choice(c: _Choice, inline: bool, token_ids: list[int]) -> dict:
    d = {"index": c.index, "prompt_index": c.prompt_index, "token_ids": token_ids}
    if c.receipt_id is not None:
        d["receipt_id"] = c.receipt_id
        if inline:
            d["receipt"] = json.loads(c.receipt.to_json())
    return d


async def _generate(request: Request, st: ServerState, kind: str, body, prompts, params: SamplingParams):
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    q: asyncio.Queue = asyncio.Queue()
    handles = []
    try:
        for _, ids in prompts:
            handles.append(st.loop.submit(ids, params, stream=body.stream, events=q))
    except QueueFull as e:
        for h in handles:
            st.loop.abort(h)
        st.metrics.inc("ditto_requests_rejected_total")
        raise ApiError(429, f"server busy: {e}; retry later", "rate_limit_error", code="queue_full") from e
    index_of = {h.request_id: p for p, h in enumerate(handles)}
    choices = {
        (h.request_id, j): _Choice(p * params.n + j, p, j) for p, h in enumerate(handles) for j in range(params.n)
    }
    want_top = bool(params.logprobs) or (kind == "completion" and params.logprobs is not None)
    want_logprobs = params.logprobs is not None
    tok = st.llm.tokenizer
    common = {
        "seed": params.seed,
        "determinism": st.llm.config.determinism,
        "numerics": st.llm.config.numerics,
        "model_digest": st.model_digest,
        "prompt_token_ids": [ids for _, ids in prompts],
    }

    async def finish(c: _Choice, request_id: str) -> None:
        """Seal the choice's receipt off the event loop (hashing + signing + digests take a few ms)."""
        c.receipt = await asyncio.to_thread(_receipt, st, prompts[index_of[request_id]][1], c, params, rid)
        c.receipt_id = st.store(c.receipt)

    def usage() -> Usage:
        p = sum(len(ids) for _, ids in prompts)
        n = sum(len(c.ids) for c in choices.values())
        return Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n)

    def account(ok: bool) -> None:
        st.metrics.inc("ditto_prompt_tokens_total", sum(len(ids) for _, ids in prompts))
        st.metrics.inc("ditto_generation_tokens_total", sum(len(c.ids) for c in choices.values()))
        if ok:
            st.metrics.observe("ditto_request_latency_seconds", time.perf_counter() - handles[0].submitted)
            if handles[0].first_token is not None:
                st.metrics.observe("ditto_time_to_first_token_seconds", handles[0].first_token - handles[0].submitted)

    if body.stream:
        return StreamingResponse(
            _stream(
                st, kind, rid, created, body, handles, choices, params, q, common, finish, usage, account, want_top
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    pending = {h.request_id for h in handles}
    getter = None
    try:
        while pending:
            if getter is None:
                getter = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({getter}, timeout=0.5)
            if not done:
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected", code="client_closed_request")
                continue
            kind_, request_id, payload = getter.result()
            getter = None
            if kind_ == "error":
                raise payload
            if kind_ == "done":
                pending.discard(request_id)
                continue
            for j, d in payload.items():
                c = choices[(request_id, j)]
                c.add(d)
                if c.finish_reason is not None:
                    await finish(c, request_id)
    finally:
        if getter is not None:
            getter.cancel()
        if pending:
            for h in handles:
                st.loop.abort(h)
        account(not pending)
    ordered = sorted(choices.values(), key=lambda c: c.index)
    out = []
    for c in ordered:
        text = c.text(tok, params)
        lp = _logprobs(st, kind, c, 0, len(c.ids), want_top) if want_logprobs else None
        if kind == "chat":
            msg = ChatMessageOut(content=text)
            out.append(ChatChoice(index=c.index, message=msg, logprobs=lp, finish_reason=c.finish_reason))
        else:
            out.append(CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=c.finish_reason))
        out[-1].stop_reason = c.stop_reason
    ditto = dict(common, choices=[_ditto_choice(c, body.ditto_receipt, c.ids) for c in ordered])
    cls = ChatCompletionResponse if kind == "chat" else CompletionResponse
    resp = cls(id=rid, created=created, model=st.name, choices=out, usage=usage(), ditto=ditto)
    return JSONResponse(resp.model_dump())


async def _stream(st, kind, rid, created, body, handles, choices, params, q, common, finish, usage, account, want_top):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    tok = st.llm.tokenizer
    want_logprobs = params.logprobs is not None

    def chunk(choice_list, ditto=None, usage_=None) -> str:
        d = {"id": rid, "object": obj, "created": created, "model": st.name, "choices": choice_list}
        if ditto is not None:
            d["ditto"] = ditto
        if usage_ is not None:
            d["usage"] = usage_
        return "data: " + json.dumps(d, ensure_ascii=False, allow_nan=False) + "\n\n"

    pending = {h.request_id for h in handles}
    ok = False
    try:
        if kind == "chat":
            for c in sorted(choices.values(), key=lambda c: c.index):
                first = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield chunk([first])
        while pending:
            kind_, request_id, payload = await q.get()
            if kind_ == "error":
                yield "data: " + json.dumps(payload.body()) + "\n\n"
                return
            if kind_ == "done":
                pending.discard(request_id)
                continue
            for j, d in payload.items():
                c = choices[(request_id, j)]
                start = len(c.ids)
                offset = len(c.sent)
                c.add(d)
                text = c.take_text(tok, params)
                lp = _logprobs(st, kind, c, start, len(c.ids), want_top, offset) if want_logprobs else None
                if c.finish_reason is not None:
                    await finish(c, request_id)
                if kind == "chat":
                    ch = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lp}
                else:
                    ch = {"index": c.index, "text": text, "logprobs": lp}
                ch["finish_reason"] = c.finish_reason
                if c.finish_reason is not None:
                    ch["stop_reason"] = c.stop_reason
                    extra = dict(common, **_ditto_choice(c, body.ditto_receipt, d.token_ids))
                else:
                    extra = {"index": c.index, "token_ids": d.token_ids}
                yield chunk([ch], extra)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage_=usage().model_dump())
        yield "data: [DONE]\n\n"
        ok = True
    finally:
        if pending:
            for h in handles:
                st.loop.abort(h)
        account(ok)


# ---- metrics middleware ---------------------------------------------------------------------


class MetricsMiddleware:
    """Counts HTTP requests by route and status (pure ASGI: leaves streaming and disconnects alone)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            known = GENERATION_PATHS + ("/v1/models", "/v1/verify", "/health", "/metrics")
            route = path if path in known else ("/v1/receipts/{id}" if path.startswith("/v1/receipts/") else "other")
            self.metrics.inc("ditto_http_requests_total", endpoint=route, status=str(status[0]))
