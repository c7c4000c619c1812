"""Generation responses for the HTTP API: one engine request per prompt, choices assembled from
engine deltas (streamed as SSE chunks or returned whole), logprobs in OpenAI's shapes, one sealed
receipt per choice, usage and metrics."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ditto.outputs import CompletionOutput, RequestOutput
from ditto.sampling import SamplingParams
from ditto.server.engine_loop import Delta, QueueFull
from ditto.server.protocol import (
    ApiError,
    ChatChoice,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from ditto.verify.receipt import Receipt

if TYPE_CHECKING:
    from ditto.server.state import ServerState


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


def piece_namer(st: ServerState, body) -> Callable[[int], str]:
    """How tokens are named in logprobs: their text, or "token_id:<id>" when the request sets vLLM's
    `return_tokens_as_token_ids` (so clients get exact ids for sampled and top tokens)."""
    if getattr(body, "return_tokens_as_token_ids", False):
        return lambda t: f"token_id:{t}"
    return st.piece


def _logprobs(name: Callable[[int], str], kind: str, c: _Choice, start: int, end: int, want_top: bool, offset=0):
    ids, lps, tops = c.ids[start:end], c.logprobs[start:end], c.tops[start:end]
    if kind == "chat":
        content = []
        for i, tok in enumerate(ids):
            piece = name(tok)
            top = []
            if want_top and i < len(tops):
                top = [
                    {"token": name(t), "logprob": _clean(v), "bytes": list(name(t).encode())}
                    for t, v in tops[i].items()
                ]
            content.append(
                {"token": piece, "logprob": _clean(lps[i]), "bytes": list(piece.encode()), "top_logprobs": top}
            )
        return {"content": content}
    tokens = [name(t) for t in ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = None
    if want_top:
        top = [_top_dict(name, tops[i]) if i < len(tops) else {} for i in range(len(ids))]
    return {"tokens": tokens, "token_logprobs": [_clean(x) for x in lps], "top_logprobs": top, "text_offset": offsets}


def _top_dict(name: Callable[[int], str], top: dict[int, float]) -> dict[str, float]:
    """OpenAI's completions format keys top logprobs by token text; two ids with the same text (e.g.
    partial UTF-8 bytes) would collide, so a repeat is keyed "token_id:<id>" instead."""
    out: dict[str, float] = {}
    for t, v in top.items():
        key = name(t)
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


async def generate_response(request: Request, st: ServerState, kind: str, body, prompts, params: SamplingParams):
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
        lp = _logprobs(piece_namer(st, body), kind, c, 0, len(c.ids), want_top) if want_logprobs else None
        if kind == "chat":
            msg = ChatMessageOut(content=text)
            out.append(ChatChoice(index=c.index, message=msg, logprobs=lp, finish_reason=c.finish_reason))
        else:
            out.append(CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=c.finish_reason))
        out[-1].stop_reason = c.stop_reason
    ditto = dict(common, choices=[_ditto_choice(c, body.ditto_receipt, c.ids) for c in ordered])
    cls = ChatCompletionResponse if kind == "chat" else CompletionResponse
    resp = cls(
        id=rid,
        created=created,
        model=st.name,
        choices=out,
        usage=usage(),
        system_fingerprint=st.system_fingerprint,
        ditto=ditto,
    )
    return JSONResponse(resp.model_dump())


async def _stream(st, kind, rid, created, body, handles, choices, params, q, common, finish, usage, account, want_top):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    tok = st.llm.tokenizer
    want_logprobs = params.logprobs is not None
    name = piece_namer(st, body)

    def chunk(choice_list, ditto=None, usage_=None) -> str:
        d = {"id": rid, "object": obj, "created": created, "model": st.name, "choices": choice_list}
        d["system_fingerprint"] = st.system_fingerprint
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
                lp = _logprobs(name, kind, c, start, len(c.ids), want_top, offset) if want_logprobs else None
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
