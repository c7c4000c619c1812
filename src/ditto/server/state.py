"""What one server holds: the LLM, its engine loop, the receipts it issued, and how it names itself.

Identifiers
  model id            --served-model-name, else the bundled name when a bundled model is served
                      (`smollm2-135m-instruct`), else the file's stem / directory name. Requests may also
                      name the model by its file stem, its path or a registry alias of the bundled name.
  receipt id          "sha256:<64 hex digits>", the receipt's content_hash: in `ditto.choices[].receipt_id`,
                      in /v1/receipts/{id}, in /v1/verify (answer and request) and in the logs. Requests
                      may also give the bare 64 hex digits (the form earlier versions of this server handed out).
  system_fingerprint  "ditto-<version>:<numerics>:<determinism>:<model digest>", e.g.
                      "ditto-0.2.0:fp32:batch_invariant:1045a3c1...(64 hex)": in every completion and chat
                      response and stream chunk, and on /v1/models. The model digest is `llm.model_digest`
                      verbatim, the same string as the receipts' and `ditto.model_digest` (sha256 of the
                      weight files plus what the numerics mode adds, e.g. calibration data); it goes last,
                      so `fp.split(":", 3)` gives the four parts even for a digest written "sha256:<hex>".
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict

from ditto.loader.registry import ALIASES, bundled_name_of
from ditto.server.engine_loop import EngineLoop, Metrics
from ditto.server.protocol import ApiError
from ditto.verify.receipt import Receipt, hardware_info, load_private_key

log = logging.getLogger("ditto.server")

RECEIPT_ID_FORMAT = "sha256:<64 hex digits>"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def canonical_receipt_id(value: str, param: str = "receipt_id") -> str:
    """sha256:<64 lowercase hex> for a receipt id given with or without the prefix (400 otherwise)."""
    digits = value.removeprefix("sha256:")
    if not _HEX64.fullmatch(digits):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise ApiError(400, f"{param} {shown!r} is not a receipt id; expected {RECEIPT_ID_FORMAT}", param=param)
    return "sha256:" + digits.lower()


def served_model_id(llm, served_name: str | None = None) -> str:
    """The model id clients see and send: --served-model-name, else the bundled name, else the file's name."""
    return served_name or bundled_name_of(llm.loaded.path) or llm.loaded.name


def system_fingerprint(llm) -> str:
    """The OpenAI system_fingerprint: ditto-<version>:<numerics>:<determinism>:<model digest> (see above)."""
    from ditto import __version__

    return f"ditto-{__version__}:{llm.config.numerics}:{llm.config.determinism}:{llm.model_digest}"


class ServerState:
    """Everything the routes share; the engine itself is only touched by `loop`'s thread."""

    def __init__(
        self,
        llm,
        served_name: str | None,
        api_key: str | None,
        sign_key,
        max_queue: int,
        max_body_bytes: int,
        max_receipts: int,
    ) -> None:
        self.llm = llm
        self.name = served_model_id(llm, served_name)
        bundled = bundled_name_of(llm.loaded.path)
        self.aliases = {self.name, llm.loaded.name, str(llm.loaded.path)}
        if bundled is not None:
            self.aliases |= {bundled} | {alias for alias, name in ALIASES.items() if name == bundled}
        self.api_key = api_key or None
        self.sign_key = load_private_key(sign_key) if sign_key else None
        self.max_body_bytes = max_body_bytes
        self.max_receipts = max_receipts
        self.receipts: OrderedDict[str, Receipt] = OrderedDict()  # "sha256:<hex>" -> receipt
        self.metrics = Metrics()
        self.loop = EngineLoop(llm, max_queue=max_queue, metrics=self.metrics)
        self.model_digest = llm.model_digest
        self.system_fingerprint = system_fingerprint(llm)
        self.tokenizer_digest = getattr(llm.tokenizer, "digest", "") or ""
        self.hardware = hardware_info(str(getattr(llm, "device", "cpu")))
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
        """Keep a sealed receipt; its id is its content hash, "sha256:<64 hex>"."""
        rid = receipt.content_hash
        if rid is None:
            raise ValueError("only sealed receipts are served")
        self.receipts[rid] = receipt
        while len(self.receipts) > self.max_receipts:
            self.receipts.popitem(last=False)
        log.debug("receipt %s issued", rid)
        return rid

    def receipt(self, receipt_id: str, param: str = "receipt_id") -> Receipt:
        """The stored receipt with this id (400 for a malformed id, 404 for an unknown one)."""
        rid = canonical_receipt_id(receipt_id, param)
        receipt = self.receipts.get(rid)
        if receipt is None:
            raise ApiError(404, f"no receipt {rid} on this server", "not_found_error", param)
        return receipt
