"""`ditto serve`: an OpenAI-compatible HTTP API over one shared engine loop, with receipts.

Endpoints
  GET  /v1/models                 the one served model (+ `ditto`: numerics, determinism, digests, engine)
  POST /v1/completions            prompt: str | [str] | [int] | [[int]]; stream, n, seed, logprobs (0-20), stop,
                                  max_tokens, temperature, top_p, presence/frequency_penalty; echo with
                                  max_tokens 0 scores the prompt (its logprobs, see ditto.server.echo)
  POST /v1/chat/completions       messages (text content); logprobs + top_logprobs; max_tokens or
                                  max_completion_tokens (both: default 512, capped at the room the context leaves)
  GET  /v1/receipts/{id}          a receipt this server issued (canonical JSON)
  POST /v1/verify                 a receipt replayed on this server's model (ditto.verify.replay), see
                                  ditto.server.verify_api: the receipt document itself (as GET
                                  /v1/receipts/{id} returns it), {"receipt": {...}} or {"receipt_id": "..."}
                                  -> {"status": exact | consistent | inconsistent | unverifiable, ...}
  GET  /health, GET /metrics      liveness; Prometheus text (requests, tokens, queue depth, running
                                  sequences, KV blocks, latency and time-to-first-token histograms)

Identifiers (model id, receipt id, system_fingerprint): see ditto.server.state.

ditto extensions accepted in both generation bodies: top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, skip_special_tokens, include_stop_str_in_output, fingerprint_k
(Activation-DiFR fingerprints in the receipt), ditto_receipt (inline the receipts) and vLLM's
return_tokens_as_token_ids (logprobs name tokens "token_id:<id>"). Unknown
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

import contextlib
import hmac
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditto.server.echo import echo_response
from ditto.server.engine_loop import Metrics
from ditto.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    sampling_params,
)
from ditto.server.responses import generate_response
from ditto.server.state import ServerState
from ditto.server.validation import (
    check_model,
    check_prompts,
    completion_prompts,
    max_tokens_for,
    message_dict,
    parse_body,
    read_json,
)
from ditto.server.verify_api import add_receipt_routes

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


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
    app = FastAPI(title="ditto", lifespan=_lifespan(st), docs_url=None, redoc_url=None)
    app.state.ditto = st
    app.add_middleware(MetricsMiddleware, metrics=st.metrics)
    _add_error_handlers(app)
    guarded = [Depends(_auth(st))]
    _add_open_routes(app, st)
    _add_model_routes(app, st, guarded)
    _add_generation_routes(app, st, guarded)
    add_receipt_routes(app, st, guarded)
    return app


def _lifespan(st: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        st.loop.start()
        try:
            yield
        finally:
            st.loop.stop()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ApiError as raised, routing errors, validation, anything else as 500."""

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


def _auth(st: ServerState) -> Callable:
    """The dependency that guards /v1 routes: 'Authorization: Bearer <key>' when the server has a key."""

    async def auth(request: Request) -> None:
        if st.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), st.api_key.encode()):
            raise ApiError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    return auth


def _add_open_routes(app: FastAPI, st: ServerState) -> None:
    """/health and /metrics: no API key."""

    @app.get("/health")
    async def health():
        ok = st.loop.alive
        body = {"status": "ok" if ok else "engine loop stopped", "model": st.name, "queue_depth": st.loop.waiting}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")


def _add_model_routes(app: FastAPI, st: ServerState, guarded: list) -> None:
    @app.get("/v1/models", dependencies=guarded)
    async def models():
        info = st.llm.info()
        card = {"id": st.name, "object": "model", "created": st.created, "owned_by": "ditto", "ditto": info}
        card["max_model_len"] = st.max_model_len
        card["system_fingerprint"] = st.system_fingerprint
        return {"object": "list", "data": [card]}


def _add_generation_routes(app: FastAPI, st: ServerState, guarded: list) -> None:
    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        body = parse_body(CompletionRequest, await read_json(request, st.max_body_bytes))
        check_model(st, body.model)
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if body.echo:
            return await echo_response(st, body)
        prompts = completion_prompts(st, body.prompt)
        max_tokens = max_tokens_for(st, body.max_tokens, prompts)
        params = sampling_params(body, max_tokens, body.logprobs)
        return await generate_response(request, st, "completion", body, prompts, params)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        body = parse_body(ChatCompletionRequest, await read_json(request, st.max_body_bytes))
        check_model(st, body.model)
        messages = [message_dict(i, m) for i, m in enumerate(body.messages)]
        try:
            ids = st.llm.tokenizer.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
        except ValueError as e:
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from e
        prompts = [(None, ids)]
        check_prompts(st, prompts)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = max_tokens_for(st, requested, prompts)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens, logprobs)
        return await generate_response(request, st, "chat", body, prompts, params)


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
