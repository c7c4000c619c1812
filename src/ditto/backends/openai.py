"""A Backend on any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, `ditto serve`) over HTTP.

    backend = OpenAIBackend("http://127.0.0.1:8000", tokenizer="smollm2-135m-instruct")
    ditto eval --backend openai --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct ...

What is whose:
- Prompts are rendered and encoded HERE, with ditto's tokenizer of `tokenizer` (the CLI's --model: the
  served model's bundled name, .gguf or HF folder), and sent as token ids when the server takes them,
  so every backend sees the same prompt. A `ditto serve` server reports its tokenizer digest, and a
  different local tokenizer is refused at construction.
- Sampling is the server's: /v1/completions with n, seed, temperature, top_p (and top_k, min_p,
  repetition_penalty, ... only when set: they are vLLM/ditto extensions), max_tokens, stop and
  logprobs. Against `ditto serve` that is ditto's own counter-based sampler, so under batch_invariant
  the tokens and logprobs equal the in-process engine's bit for bit.
- Scoring (teacher-forced logprobs) is `echo` + `logprobs` or vLLM's `prompt_logprobs`, whichever the
  server offers (ditto.backends.openai_probe); without either, `score` raises ScoringUnavailable, and
  `can_score` is False so strategy runs that score refuse to start.
- Requests run on a pool of `max_concurrency` threads over one pooled connection; 429, 5xx, timeouts and
  dropped connections are retried with exponential backoff (ditto.backends.openai_http), then fail.
- Every answer's `system_fingerprint` must equal the one seen at construction: a server that was
  replaced by a different model or build mid-run is an error, not a silently mixed run.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ditto.backends.base import params_per_prompt
from ditto.backends.openai_http import Http, HttpError, RetryPolicy, ServerUnavailable, version_headers
from ditto.backends.openai_probe import Capabilities, probe
from ditto.backends.openai_score import ScoringUnavailable, score_request
from ditto.outputs import CompletionOutput, RequestOutput, ScoreOutput
from ditto.sampling import SamplingParams

__all__ = ["OpenAIBackend", "ScoringUnavailable", "ServerUnavailable", "HttpError", "RetryPolicy"]

PROBE_TEXT = "The answer is 42."
_EXTRAS = {  # SamplingParams field -> its neutral value; sent only when different (vLLM / ditto extensions)
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "ignore_eos": False,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
}
_NEG_INF_SENTINEL = -9999.0  # how ditto's server writes -inf in JSON


def _load_tokenizer(spec):
    from ditto.loader.registry import resolve_model
    from ditto.loader.tokenizer import Tokenizer

    if spec is None:
        raise ValueError(
            "the openai backend needs the served model's tokenizer: give --model (its bundled name, .gguf or HF folder)"
        )
    if not isinstance(spec, str | os.PathLike):
        return spec  # a tokenizer object
    return Tokenizer.load(resolve_model(str(spec)))


def _token_id(name) -> int | None:
    s = str(name)
    return int(s[len("token_id:") :]) if s.startswith("token_id:") else None


def _logprob(x) -> float:
    return float("-inf") if x is None or x == _NEG_INF_SENTINEL else float(x)


class OpenAIBackend:
    """Backend protocol over an OpenAI-compatible /v1/completions endpoint."""

    name = "openai"
    thread_safe = True  # strategy runs may call it from several threads; requests share the pool

    def __init__(
        self,
        base_url: str,
        *,
        tokenizer=None,
        api_key: str | None = None,
        served_model: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
    ):
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.http = Http(base_url, api_key, self.timeout_s, retry, self.max_concurrency)
        self.tokenizer = _load_tokenizer(tokenizer)
        models, headers = self.http.get("/models")
        cards = [c for c in models.get("data", []) if isinstance(c, dict)]
        ids = [str(c.get("id")) for c in cards]
        if not cards:
            raise HttpError(404, f"{self.http.api}/models lists no model")
        if served_model is not None and served_model not in ids:
            raise ValueError(f"the server does not serve {served_model!r}; it serves: {', '.join(ids)}")
        self.model = served_model or ids[0]
        self.card = cards[ids.index(self.model)]
        self.server_info = self.card.get("ditto") if isinstance(self.card.get("ditto"), dict) else None
        self._check_tokenizer()
        self.headers = version_headers(headers)
        self.server_version = self._server_version()
        probe_ids = self.encode(PROBE_TEXT)
        self.caps: Capabilities = probe(self.http, self.model, probe_ids, PROBE_TEXT, self.server_info is not None)
        self.system_fingerprint = self.caps.system_fingerprint
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="openai-backend")
        self._lock = threading.Lock()
        self.requests = 0

    # ------------------------------------------------------------------ identity
    def _check_tokenizer(self) -> None:
        served = (self.server_info or {}).get("tokenizer_digest")
        local = getattr(self.tokenizer, "digest", None)
        if served and local and served != local:
            raise ValueError(
                f"the local tokenizer (--model) is not the served model's: digest {local[:16]}... here, "
                f"{served[:16]}... on the server ({self.server_info.get('model_name', self.model)}); "
                "give --model the model the server runs"
            )

    def _server_version(self) -> str | None:
        if self.server_info is not None:
            return f"ditto {self.server_info.get('ditto_version')}"
        try:  # vLLM and SGLang answer GET /version
            body, _ = self.http.get("/version", root=True, attempts=1)
            return str(body.get("version")) if isinstance(body, dict) else None
        except (HttpError, ServerUnavailable):
            return None

    def _check_fingerprint(self, resp: dict) -> None:
        fp = resp.get("system_fingerprint")
        if self.system_fingerprint is not None and fp is not None and fp != self.system_fingerprint:
            raise ServerUnavailable(
                f"the server changed under the run: system_fingerprint {self.system_fingerprint} at the start, "
                f"{fp} now; resume against the original server (or start a new run)"
            )

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def _ids(self, prompt) -> list[int]:
        return [int(t) for t in prompt] if isinstance(prompt, list) else self.encode(prompt)

    def _wire_prompt(self, prompt, ids: list[int]):
        if self.caps.prompt_ids:
            return ids
        return prompt if isinstance(prompt, str) else self.decode(ids)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, params, *, progress: bool = False) -> list[RequestOutput]:
        """One request per prompt (n samples each), at most `max_concurrency` in flight; prompt order kept."""
        plist = params_per_prompt(prompts, params)
        for p in plist:
            if p.fingerprint_k and not self.caps.ditto:
                raise ValueError("fingerprint_k needs a ditto server (Activation-DiFR fingerprints)")
        futures = [self._pool.submit(self._one, i, pr, sp) for i, (pr, sp) in enumerate(zip(prompts, plist))]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()  # after a failure: requests not yet sent are not sent

    def _body(self, wire_prompt, sp: SamplingParams) -> dict:
        body = {
            "model": self.model,
            "prompt": wire_prompt,
            "n": sp.n,
            "max_tokens": sp.max_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "seed": sp.seed,
            "logprobs": sp.logprobs or 0,
        }
        if sp.stop:
            body["stop"] = list(sp.stop)
        if sp.stop_token_ids:
            body["stop_token_ids"] = list(sp.stop_token_ids)
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(sp, name):
                body[name] = getattr(sp, name)
        for name, neutral in _EXTRAS.items():
            if getattr(sp, name) != neutral:
                body[name] = getattr(sp, name)
        if sp.fingerprint_k:
            body["fingerprint_k"] = sp.fingerprint_k
        if self.caps.token_id_names:
            body["return_tokens_as_token_ids"] = True
        return body

    def _one(self, i: int, prompt, sp: SamplingParams) -> RequestOutput:
        t0 = time.perf_counter()
        ids = self._ids(prompt)
        resp, _ = self.http.post("/completions", self._body(self._wire_prompt(prompt, ids), sp))
        self._check_fingerprint(resp)
        with self._lock:
            self.requests += 1
        ditto = resp.get("ditto") if isinstance(resp.get("ditto"), dict) else {}
        ditto_choices = {c.get("index"): c for c in ditto.get("choices", [])}
        comps = []
        for choice in sorted(resp.get("choices", []), key=lambda c: c["index"]):
            comps.append(self._completion(choice, ditto_choices.get(choice["index"]), sp))
        if len(comps) != sp.n:
            raise HttpError(200, f"asked for n={sp.n} samples, the server returned {len(comps)}", resp)
        served_ids = (ditto.get("prompt_token_ids") or [None])[0]
        return RequestOutput(
            request_id=str(resp.get("id", f"openai-{i}")),
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=list(served_ids) if served_ids else ids,
            outputs=comps,
            finished=True,
            metrics={
                "seed": sp.seed,
                "backend": self.name,
                "server_model": self.model,
                "system_fingerprint": resp.get("system_fingerprint"),
                "determinism": ditto.get("determinism", "unknown (server)"),
                "numerics": ditto.get("numerics", "unknown (server)"),
                "latency_s": time.perf_counter() - t0,
            },
        )

    def _completion(self, choice: dict, dchoice: dict | None, sp: SamplingParams) -> CompletionOutput:
        lp = choice.get("logprobs") or {}
        names = lp.get("tokens") or []
        if dchoice is not None and "token_ids" in dchoice:
            toks = [int(t) for t in dchoice["token_ids"]]
        elif names and all(_token_id(t) is not None for t in names):
            toks = [_token_id(t) for t in names]
        elif isinstance(choice.get("token_ids"), list):  # vLLM's return_token_ids
            toks = [int(t) for t in choice["token_ids"]]
        else:  # only text came back: re-encode it (may differ from the ids the server sampled)
            toks = self.encode(choice.get("text", ""), add_special_tokens=False)
        lps = [_logprob(x) for x in lp.get("token_logprobs") or []]
        if len(lps) != len(toks):
            lps = [float("nan")] * len(toks)
        tops = None
        if sp.logprobs and lp.get("top_logprobs"):
            tops = []
            for d in lp["top_logprobs"]:
                keyed = {_token_id(k): _logprob(v) for k, v in (d or {}).items()}
                tops.append({k: v for k, v in keyed.items() if k is not None})
        return CompletionOutput(
            index=int(choice["index"]) % sp.n,
            text=choice.get("text", ""),
            token_ids=toks,
            logprobs=lps,
            finish_reason=choice.get("finish_reason"),
            top_logprobs=tops,
            stop_reason=choice.get("stop_reason"),
        )

    # ------------------------------------------------------------------ scoring
    @property
    def can_score(self) -> bool:
        return self.caps.scoring is not None

    def require_scoring(self) -> None:
        """ScoringUnavailable (naming what the server lacks) unless the server can score."""
        if not self.can_score:
            raise ScoringUnavailable(
                f"the server at {self.http.api} cannot score (teacher-forced logprobs): it accepts neither "
                f"`echo` with `logprobs` nor vLLM's `prompt_logprobs` ({self.caps.scoring_error})"
            )

    def score(self, prompt, continuation) -> ScoreOutput:
        self.require_scoring()
        p_ids = self._ids(prompt)
        c_ids = [int(t) for t in continuation] if isinstance(continuation, list) else self.encode(continuation, False)
        if not c_ids:
            raise ValueError("empty continuation: nothing to score")
        ids = p_ids + c_ids
        resp, lps, tops = score_request(self, ids)
        self._check_fingerprint(resp)
        n = len(p_ids)
        return ScoreOutput(
            prompt_token_ids=p_ids,
            token_ids=c_ids,
            logprobs=[_logprob(x) for x in lps[n : len(ids)]],
            top_ids=tops[n : len(ids)] if tops is not None and None not in tops[n : len(ids)] else None,
        )

    # ------------------------------------------------------------------ manifest
    def info(self) -> dict:
        srv = self.server_info or {}
        return {
            "backend": self.name,
            "base_url": self.http.api,
            "model": self.model,
            # what resumption and pairing key on: the served weights' digest when the server reports it
            "model_digest": srv.get("model_digest") or f"served-model-id:{self.model}",
            "tokenizer_digest": getattr(self.tokenizer, "digest", None),
            "numerics": srv.get("numerics", "unknown (the server's)"),
            "determinism": srv.get("determinism", "unknown (the server's)"),
            "sampler": srv.get("sampler", "the server's own"),
            "server_model_card": self.card,
            "server_version": self.server_version,
            "server_headers": self.headers,
            "system_fingerprint": self.system_fingerprint,
            "capabilities": self.caps.record(),
            "max_concurrency": self.max_concurrency,
            "timeout_s": self.timeout_s,
            "retry": self.http.retry.record(),
            "chat_template": "rendered by ditto.loader.tokenizer (same text as the ditto backend)",
            "versions": {"python": platform.python_version()},
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
