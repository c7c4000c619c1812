"""GET /v1/receipts/{id} and POST /v1/verify: a receipt replayed on this server's model.

/v1/verify takes one of three bodies:
  * the receipt document itself, exactly as GET /v1/receipts/{id} returns it (recognised by its
    "schema": "ditto.receipt/v1"); `public_key` and `threshold` then go in the query string
    (a receipt has a `public_key` field of its own: the signer's);
  * {"receipt": {...}, "public_key": ..., "threshold": ...};
  * {"receipt_id": "sha256:<64 hex>", "public_key": ..., "threshold": ...} for a receipt this
    server issued (404 when it has none by that id).
`public_key` (hex or PEM text: never a path on the server) requires a signature by that Ed25519 key;
`threshold` is the Token-DiFR score up to which a non-exact replay is `consistent`.

The rules are ditto.verify.replay's, in its order: the model-free checks (precheck_receipt: content
hash, signature, the receipt's claims against each other) answer here, before any engine work is
queued; only a receipt that passes them is replayed by verify_receipt on the engine thread. Every
verdict is HTTP 200: the Verdict's JSON (`status`: exact | consistent | inconsistent | unverifiable,
`reason`, `divergence`, ...) plus `verdict` (= status, for older clients), `receipt_id` and `server`
(what this server runs). A body that is not a receipt is a 400 naming the field and the problem.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ditto.server.protocol import ApiError, VerifyRequest
from ditto.server.validation import parse_body, read_json
from ditto.verify.receipt import SCHEMA_VERSION, Receipt, load_public_key
from ditto.verify.replay import precheck_receipt, verify_receipt
from ditto.verify.verdict import Verdict

if TYPE_CHECKING:
    from ditto.server.state import ServerState

log = logging.getLogger("ditto.server")

QUERY_OPTIONS = ("public_key", "threshold")
_JSON_TYPE = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
_CONTAINERS = {  # receipt field -> the JSON type it must have (checked before the Receipt is built)
    "prompt_token_ids": list,
    "output_token_ids": list,
    "sampling": dict,
    "hardware": dict,
    "extra": dict,
    "output_logprobs": (list, type(None)),
    "fingerprints": (list, type(None)),
}


@dataclass(frozen=True)
class VerifyInput:
    receipt: Receipt
    public_key: str | None
    threshold: float | None


def add_receipt_routes(app: FastAPI, st: ServerState, guarded: list) -> None:
    @app.get("/v1/receipts/{receipt_id}", dependencies=guarded)
    async def get_receipt(receipt_id: str):
        return Response(st.receipt(receipt_id).to_json(), media_type="application/json")

    @app.post("/v1/verify", dependencies=guarded)
    async def verify(request: Request):
        body = await read_json(request, st.max_body_bytes)
        return await verify_response(st, verify_input(st, body, request.query_params))


def verify_input(st: ServerState, body: dict, query: Mapping[str, str]) -> VerifyInput:
    """The receipt and options of a /v1/verify request, or a 400 (404: unknown receipt_id) naming the problem."""
    unknown = sorted(set(query) - set(QUERY_OPTIONS))
    if unknown:
        raise ApiError(
            400, f"unknown query parameter(s) {unknown}; /v1/verify takes {list(QUERY_OPTIONS)}", param=unknown[0]
        )
    if "schema" in body:  # the bare receipt document
        if body["schema"] != SCHEMA_VERSION:
            raise ApiError(
                400, f"body has schema {body['schema']!r}; /v1/verify reads receipts of schema {SCHEMA_VERSION!r}",
                param="schema",
            )  # fmt: skip
        receipt, pk, th = parse_receipt(body, "body"), None, None
    elif "receipt" in body or "receipt_id" in body:
        req = parse_body(VerifyRequest, body)
        if (req.receipt is None) == (req.receipt_id is None):
            raise ApiError(400, "give exactly one of 'receipt' (a receipt document) or 'receipt_id'", param="receipt")
        receipt = parse_receipt(req.receipt, "receipt") if req.receipt is not None else st.receipt(req.receipt_id)
        pk, th = req.public_key, req.threshold
    else:
        raise ApiError(
            400,
            f'the body is not a receipt: send the receipt document (with "schema": {SCHEMA_VERSION!r}), '
            f'{{"receipt": {{...}}}} or {{"receipt_id": "sha256:<64 hex>"}}; got keys {sorted(body)[:8]}',
            param="receipt",
        )
    pk = _once("public_key", pk, query.get("public_key"))
    th = _once("threshold", th, _query_float(query, "threshold"))
    return VerifyInput(receipt, _checked_public_key(pk), _checked_threshold(th))


def parse_receipt(doc: dict, where: str) -> Receipt:
    """A Receipt from a JSON document; 400 naming the field when it is not a ditto.receipt/v1 document."""
    for name, kind in _CONTAINERS.items():
        if name in doc and not isinstance(doc[name], kind):
            want = "array" if list in (kind if isinstance(kind, tuple) else (kind,)) else "object"
            got = _JSON_TYPE.get(type(doc[name]), "null")
            field = name if where == "body" else f"{where}.{name}"
            raise ApiError(400, f"{field} must be a JSON {want}, got {got}", param=field)
    try:
        return Receipt.from_dict(doc)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"{where} is not a valid {SCHEMA_VERSION} receipt: {e}", param=where) from e


async def verify_response(st: ServerState, inp: VerifyInput) -> dict:
    """Model-free checks here; the replay (if they pass) on the engine thread."""
    receipt = inp.receipt
    verdict = await asyncio.to_thread(precheck_receipt, receipt, inp.public_key)
    if verdict is None:
        fut = st.loop.call(lambda llm: verify_receipt(llm, receipt, inp.threshold, inp.public_key))
        try:
            verdict = await asyncio.wrap_future(fut)
        except ValueError as e:  # a receipt the replay cannot run
            verdict = Verdict("unverifiable", str(e), id=receipt.content_hash or "", signed=receipt.signed)
    log.info("verify %s -> %s", receipt.content_hash, verdict.status)
    server = {
        "model": st.name,
        "model_digest": st.model_digest,
        "numerics": st.llm.config.numerics,
        "determinism": st.llm.config.determinism,
        "system_fingerprint": st.system_fingerprint,
    }
    return {"verdict": verdict.status, **verdict.to_dict(), "receipt_id": receipt.content_hash, "server": server}


# ---- options ------------------------------------------------------------------------------------


def _once(name: str, in_body, in_query):
    if in_body is not None and in_query is not None:
        raise ApiError(400, f"{name} is given both in the body and in the query string; give it once", param=name)
    return in_body if in_body is not None else in_query


def _query_float(query: Mapping[str, str], name: str) -> float | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError as e:
        raise ApiError(400, f"{name} must be a number, got {raw!r}", param=name) from e


def _checked_threshold(th: float | None) -> float | None:
    if th is not None and not (math.isfinite(th) and th >= 0):
        raise ApiError(400, f"threshold must be a finite number >= 0, got {th!r}", param="threshold")
    return th


def _checked_public_key(pk: str | None) -> str | None:
    """An Ed25519 public key as 64 hex digits or PEM text. A path is refused: the server never reads
    files a client names."""
    if pk is None:
        return None
    text = pk.strip()
    if not (text.startswith("-----BEGIN") or (len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text))):
        raise ApiError(400, "public_key must be an Ed25519 public key as 64 hex digits or PEM text", param="public_key")
    try:
        load_public_key(text)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"public_key cannot be loaded: {e}", param="public_key") from e
    return text
