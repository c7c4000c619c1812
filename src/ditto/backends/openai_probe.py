"""What an OpenAI-compatible server can do, found once when the `openai` backend is built.

Each capability is tried with one tiny request (a few tokens, greedy, max 1 new token):

  prompt_ids      the prompt may be token ids (`prompt: [int]`), so the server sees exactly the ids ditto
                  encoded; else text is sent (the server re-tokenizes it)
  token_id_names  vLLM's `return_tokens_as_token_ids` (logprobs name tokens "token_id:<id>"), so
                  sampled and top tokens come back as exact ids; ditto servers also return
                  `ditto.choices[].token_ids`; else generated ids are re-encoded from the text
  scoring         teacher-forced logprobs of a prompt: `echo` + `logprobs` with max_tokens 0 (ditto, OpenAI
                  legacy) or 1 (generated token dropped), or vLLM's `prompt_logprobs`; None with the
                  reason when none works, so strategies that score refuse to start
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ditto.backends.openai_http import Http, HttpError

SCORE_MODES = ("echo", "echo+1", "prompt_logprobs")


@dataclass
class Capabilities:
    ditto: bool = False  # the server is `ditto serve` (its /v1/models card has a `ditto` record)
    prompt_ids: bool = False
    token_id_names: bool = False
    scoring: str | None = None  # one of SCORE_MODES, or None
    scoring_error: str | None = None  # why scoring is unavailable (the servers' answers)
    system_fingerprint: str | None = None

    def record(self) -> dict:
        return asdict(self)


def _base(model: str, prompt) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "seed": 0, "logprobs": 0}


def probe(http: Http, model: str, ids: list[int], text: str, is_ditto: bool) -> Capabilities:
    """The server's capabilities, from a handful of one-token requests on `ids` (= `text` encoded)."""
    caps = Capabilities(ditto=is_ditto)
    attempts = 2  # a probe that keeps failing says little; the run itself retries fully
    for prompt_ids, names in ((True, True), (True, False), (False, True), (False, False)):
        body = _base(model, ids if prompt_ids else text)
        if names:
            body["return_tokens_as_token_ids"] = True
        try:
            resp, _ = http.post("/completions", body, attempts=attempts)
        except HttpError:
            continue
        tokens = ((resp.get("choices") or [{}])[0].get("logprobs") or {}).get("tokens") or []
        caps.prompt_ids = prompt_ids
        caps.token_id_names = names and all(str(t).startswith("token_id:") for t in tokens)
        caps.system_fingerprint = resp.get("system_fingerprint")
        break
    else:
        raise HttpError(400, f"the server answers no plain completion request for model {model!r}")
    caps.scoring, caps.scoring_error = _probe_scoring(http, model, ids if caps.prompt_ids else text, len(ids), caps)
    return caps


def score_body(model: str, prompt, mode: str, names: bool) -> dict:
    """The request that scores `prompt` in `mode` (logprobs 1: the top token gives the argmax id)."""
    body = _base(model, prompt) | {"logprobs": 1}
    if mode == "prompt_logprobs":
        body["prompt_logprobs"] = 1
    else:
        body["echo"] = True
        body["max_tokens"] = 0 if mode == "echo" else 1
    if names:
        body["return_tokens_as_token_ids"] = True
    return body


def _probe_scoring(http: Http, model: str, prompt, n: int, caps: Capabilities) -> tuple[str | None, str | None]:
    errors = []
    for mode in SCORE_MODES:
        try:
            resp, _ = http.post("/completions", score_body(model, prompt, mode, caps.token_id_names), attempts=2)
        except HttpError as exc:
            errors.append(f"{mode}: {exc}")
            continue
        choice = (resp.get("choices") or [{}])[0]
        if mode == "prompt_logprobs":
            got = choice.get("prompt_logprobs") or resp.get("prompt_logprobs")
            ok = isinstance(got, list) and len(got) >= n
        else:
            got = (choice.get("logprobs") or {}).get("token_logprobs")
            ok = isinstance(got, list) and len(got) >= n and all(isinstance(x, int | float) for x in got[1:n])
        if ok:
            return mode, None
        errors.append(f"{mode}: answered without the prompt's logprobs")
    return None, "; ".join(errors)
