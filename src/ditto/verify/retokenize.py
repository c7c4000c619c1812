"""A claim's prompt and output as reference token ids, saying where each came from.

Output ids, in order of preference:
  1. claimed ids (`output_token_ids`, vLLM's `token_ids`, ditto's extension): used as they are
     (a claimed text that is not their decoding is noted);
  2. the logprob tokens: each token string encoded alone must give exactly one id, and those ids
     must decode back to the tokens joined (so boundaries are the server's own, and logprobs line
     up token for token);
  3. the text, re-tokenised whole with the reference tokenizer. Whether decode(encode(text))
     gives the text back (round-trips) is reported; even when it does, the server may have split
     the text differently, which shows as divergences at the split.
The prompt: claimed ids, else the chat template over `messages`, else the prompt text encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClaimIds:
    prompt: list[int]
    output: list[int]
    source: str  # "ids" | "logprob tokens" | "text"
    roundtrip: bool | None = None  # text re-tokenisation: decode(encode(text)) == text; else None
    notes: list[str] = field(default_factory=list)


def _decode(llm, ids: list[int], skip_special: bool = True) -> str:
    try:
        return llm.tokenizer.decode(ids, skip_special_tokens=skip_special)
    except TypeError:
        return llm.decode(ids)


def _from_tokens(llm, tokens: tuple[str, ...]) -> list[int] | None:
    ids = []
    for piece in tokens:
        got = llm.encode(piece, add_special_tokens=False)
        if len(got) != 1:
            return None
        ids.append(got[0])
    return ids if _decode(llm, ids, skip_special=False) == "".join(tokens) else None


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def claim_ids(llm, claim) -> ClaimIds:
    if claim.prompt_token_ids is not None:
        prompt = list(claim.prompt_token_ids)
    elif claim.messages is not None:
        prompt = llm.encode(llm.chat_prompt(list(claim.messages)), add_special_tokens=False)
    else:
        prompt = llm.encode(claim.prompt)
    if claim.output_token_ids is not None:
        out = list(claim.output_token_ids)
        res = ClaimIds(prompt, out, "ids")
        if claim.output_text is not None and claim.output_text not in (_decode(llm, out), _decode(llm, out, False)):
            res.notes.append("the claimed text is not the decoding of the claimed token ids")
        return res
    if claim.tokens:
        out = _from_tokens(llm, claim.tokens)
        if out is not None:
            res = ClaimIds(prompt, out, "logprob tokens")
            if claim.output_text is not None and "".join(claim.tokens) != claim.output_text:
                res.notes.append("the logprob tokens joined are not the claimed text")
            return res
    text = claim.output_text or ""
    out = llm.encode(text, add_special_tokens=False)
    why = _roundtrip_failure(llm, out, text, claim.tokens)
    res = ClaimIds(prompt, out, "text", roundtrip=why is None)
    if why is None:
        res.notes.append(f"output re-tokenised from its text ({len(out)} tokens; round-trips)")
    else:
        res.notes.append(f"output re-tokenised from its text did NOT round-trip: {why}")
    return res


def _roundtrip_failure(llm, ids: list[int], text: str, tokens: tuple[str, ...] | None) -> str | None:
    """Why the re-tokenised `ids` may not be what the server generated, or None when they round-trip:
    they decode to the text, the text has no U+FFFD (bytes lost to a partial UTF-8 character), and
    when the server named its tokens, the ids decode to those tokens one for one."""
    back = _decode(llm, ids)
    if back != text:
        return f"decoded {_short(back)} for {_short(text)}"
    if "\ufffd" in text:
        return f"the text holds {text.count(chr(0xFFFD))} U+FFFD (bytes of a partial UTF-8 character are lost)"
    if tokens is not None:
        pieces = [_decode(llm, [i], skip_special=False) for i in ids]
        if pieces != list(tokens):
            at = next((k for k, (a, b) in enumerate(zip(pieces, tokens)) if a != b), min(len(pieces), len(tokens)))
            return f"{len(ids)} reference tokens for the server's {len(tokens)}, first split differently at token {at}"
    return None
