"""`echo` on /v1/completions: the prompt's own log-probabilities (teacher forcing), no generation.

This is how OpenAI-compatible clients score text (lm-evaluation-harness, ditto's `openai` backend):
`{"prompt": ..., "echo": true, "max_tokens": 0, "logprobs": k}` returns, for every prompt token,
log p(token | the tokens before it) under the served model, in the completions `logprobs` shape
(the first token has no context: `null`). Only `max_tokens: 0` is taken (echo plus generation is
refused), and it does not stream.

The logprobs are the engine's own scoring pass (`LLM.score_batch`, run on the engine thread so it
joins the shared batch): the same bits as `LLM.score` in-process under batch_invariant and exact.
`top_logprobs` (k >= 1) come from a log-softmax of the kept logits. `ditto.choices[].prompt_top_ids`
holds the engine's argmax id at each position (null for the first).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from ditto.server.protocol import ApiError, CompletionRequest
from ditto.server.responses import piece_namer
from ditto.server.validation import completion_prompts

if TYPE_CHECKING:
    from ditto.outputs import ScoreOutput
    from ditto.server.state import ServerState


def _check(body: CompletionRequest) -> None:
    if body.max_tokens != 0:
        raise ApiError(
            400,
            "echo is supported for scoring only: send max_tokens 0 to get the prompt's logprobs (no generation)",
            param="echo",
        )
    if body.stream:
        raise ApiError(400, "echo (scoring) does not stream", param="stream")
    if body.n != 1:
        raise ApiError(400, "echo (scoring) takes n 1", param="n")
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise ApiError(400, f"logprobs must be in [0, 20], got {body.logprobs}", param="logprobs")


def _finite(x: float) -> float:
    return x if x == x and abs(x) != float("inf") else -9999.0


def _choice(st: ServerState, body: CompletionRequest, index: int, text, ids: list[int], out: ScoreOutput | None):
    name = piece_namer(st, body)
    tokens = [name(t) for t in ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    lps = [None] + ([_finite(x) for x in out.logprobs] if out is not None else [])
    top: list | None = None
    if body.logprobs:
        import torch

        top = [None]
        if out is not None:
            rows = torch.log_softmax(out.logits.float(), dim=-1)  # (C, V)
            vals, idx = rows.topk(body.logprobs, dim=-1)  # (C, k)
            for v_row, i_row in zip(vals.tolist(), idx.tolist()):
                d: dict[str, float] = {}
                for t, v in zip(i_row, v_row):
                    key = name(t)
                    d[key if key not in d else f"token_id:{t}"] = _finite(v)
                top.append(d)
    logprobs = None
    if body.logprobs is not None:
        logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}
    if text is None:
        text = st.llm.tokenizer.decode(ids, skip_special_tokens=False)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": "length", "stop_reason": None}


async def echo_response(st: ServerState, body: CompletionRequest) -> JSONResponse:
    """The response to an echo request (see the module doc)."""
    _check(body)
    prompts = completion_prompts(st, body.prompt)
    pairs = [(ids[:1], ids[1:]) for _, ids in prompts if len(ids) > 1]
    keep = bool(body.logprobs)
    scored: list = []
    if pairs:
        fut = st.loop.call(lambda llm: llm.score_batch(pairs, keep_logits=keep))
        scored = await asyncio.wrap_future(fut)
    it = iter(scored)
    choices, ditto_choices = [], []
    for i, (text, ids) in enumerate(prompts):
        out = next(it) if len(ids) > 1 else None
        choices.append(_choice(st, body, i, text, ids, out))
        top_ids = [None] + (list(out.top_ids or []) if out is not None else [])
        ditto_choices.append({"index": i, "prompt_index": i, "token_ids": [], "prompt_top_ids": top_ids})
    n_prompt = sum(len(ids) for _, ids in prompts)
    st.metrics.inc("ditto_prompt_tokens_total", n_prompt)
    return JSONResponse(
        {
            "id": "cmpl-" + uuid.uuid4().hex,
            "object": "text_completion",
            "created": int(time.time()),
            "model": st.name,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt},
            "system_fingerprint": st.system_fingerprint,
            "ditto": {
                "seed": None,
                "determinism": st.llm.config.determinism,
                "numerics": st.llm.config.numerics,
                "model_digest": st.model_digest,
                "prompt_token_ids": [ids for _, ids in prompts],
                "choices": ditto_choices,
            },
        }
    )
