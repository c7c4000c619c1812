"""Tokenizer: built from GGUF metadata or an HF `tokenizer.json`, run by the `tokenizers` library.

GGUF vocabularies (`tokenizer.ggml.model`):
- `gpt2`: byte-level BPE with the file's merges. `tokenizer.ggml.pre` picks the split regex, as in
  llama.cpp's llama-vocab.cpp (e.g. `smollm` = StarCoder style: every digit on its own, then the
  GPT-2 regex; that is also what SmolLM2's own tokenizer.json does).
- `llama`: SentencePiece BPE with byte fallback; merges rebuilt from the vocabulary (every split
  of a token into two tokens, best token first: by score, or for the Gemma family by position in
  the file, whose scores only restate it). Gemma: no prefix space, spaces written as '▁', and
  whitespace-run tokens respelled from ' ' to '▁'.
Control tokens (token_type 3) are special added tokens, user-defined ones (4) plain added tokens,
so both are matched whole in text. Ids equal transformers' GGUF tokenizer (tests/test_tokenizer.py),
except that transformers ignores `pre = smollm` and so misses its digit split.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from ditto.loader.chat_template import render_chat_template
from ditto.loader.gguf_file import GGUFFile, read_gguf_metadata

__all__ = ["IncrementalDecoder", "Tokenizer", "merges_from_ranks", "read_gguf_metadata"]

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
END_OF_TURN = (
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
)
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3n")

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regexes applied in order, ignore_merges); names as in llama.cpp.
_PRE_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), ((_GPT2_SPLIT,), False)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
        ((r"\p{N}", _GPT2_SPLIT), False),
    ),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), ((_LLAMA3_SPLIT,), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), ((_QWEN2_SPLIT,), False)),
}


def _metadata_of(path_or_reader) -> dict[str, Any]:
    if isinstance(path_or_reader, GGUFFile):
        return path_or_reader.metadata
    if hasattr(path_or_reader, "fields"):  # a gguf.GGUFReader
        keep = ("tokenizer.", "general.architecture")
        return {k: f.contents() for k, f in path_or_reader.fields.items() if k.startswith(keep)}
    return read_gguf_metadata(path_or_reader)


# ---------------------------------------------------------------- building from GGUF
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def merges_from_ranks(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a BPE vocabulary implies: every split of a token into two tokens, best rank first.

    Ties go to the longer left piece, then the longer right one (transformers' `generate_merges`).
    """
    entries = []  # (-score, -len(left), -len(right), order, left, right): sorts best first, stably
    for token, score in rank.items():
        n = len(token)
        for i in range(1, n):
            left = token[:i]
            if left in vocab and (right := token[i:]) in vocab:
                entries.append((-score, -i, i - n, len(entries), left, right))
    entries.sort()
    return [(e[4], e[5]) for e in entries]


def _byte_level_backend(meta: dict[str, Any]) -> tuple[Backend, list[str]]:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(_PRE_SPLITS)}")
    splits, ignore_merges = _PRE_SPLITS[pre]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = [
        t if set(t) <= alphabet else "".join(map(spelling.get, t.encode())) for t in meta["tokenizer.ggml.tokens"]
    ]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    model = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges)
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def _sentencepiece_backend(meta: dict[str, Any]) -> tuple[Backend, list[str]]:
    tokens = list(meta["tokenizer.ggml.tokens"])
    gemma = meta.get("general.architecture") in GEMMA_ARCHS
    if gemma:  # whitespace-run tokens are stored as real spaces; their merges need '▁'
        tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
        rank = {t: -i for i, t in enumerate(tokens)}
    elif "tokenizer.ggml.scores" in meta:
        rank = dict(zip(tokens, meta["tokenizer.ggml.scores"]))
    else:  # no scores: the file's order is the only ranking there is
        rank = {t: -i for i, t in enumerate(tokens)}
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = BPE(
        vocab=vocab,
        merges=merges_from_ranks(vocab, rank),
        byte_fallback=True,
        fuse_unk=True,
        unk_token=tokens[unk] if unk is not None else None,
    )
    backend = Backend(model)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma or not meta.get("tokenizer.ggml.add_space_prefix", True):
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend, tokens


_BUILDERS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def _add_file_tokens(backend: Backend, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens."""
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    # token_to_id per candidate, not `in get_vocab()`: that dict of the whole vocabulary costs more than the lookups
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and backend.token_to_id(t) is not None]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _set_post_processor(backend: Backend, bos: str | None, eos: str | None) -> None:
    """BOS/EOS added by `encode(..., add_special_tokens=True)` (None: neither)."""
    single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
    pair = " ".join([single, *([bos] if bos else []), "$B:1", *([eos] if eos else [])])
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---------------------------------------------------------------- the tokenizer
class Tokenizer:
    """Text <-> token ids, special and stop tokens, and the model's chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids=(),
        chat_template: str | None = None,
        source: str = "",
        template_vars: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.template_vars = dict(template_vars or {})  # more special-token names the chat template may use
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        stops = {i for i in (eos_id, *stop_ids) if i is not None}
        stops |= {i for t in END_OF_TURN if (i := backend.token_to_id(t)) is not None and i in self._special}
        self.stop_ids: frozenset[int] = frozenset(stops)
        ids = backend.encode("", add_special_tokens=True).ids
        self.add_bos: bool = bos_id is not None and ids[:1] == [bos_id]

    # -- construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """A .gguf file or an HF directory (tokenizer.json)."""
        path = Path(path)
        return cls.from_hf_dir(path) if path.is_dir() else cls.from_gguf(path)

    @classmethod
    def from_gguf(cls, path_or_reader) -> Tokenizer:
        """From a GGUF file's metadata (a path, a GGUFFile or a gguf.GGUFReader)."""
        meta = _metadata_of(path_or_reader)
        kind = meta.get("tokenizer.ggml.model")
        if kind not in _BUILDERS:
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: {sorted(_BUILDERS)})")
        if not meta.get("tokenizer.ggml.tokens"):
            raise ValueError("the GGUF file has no tokenizer.ggml.tokens: it carries no vocabulary")
        backend, tokens = _BUILDERS[kind](meta)
        _add_file_tokens(backend, tokens, list(meta.get("tokenizer.ggml.token_type", [])), kind == "gpt2")
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None
        _set_post_processor(backend, tokens[bos] if add_bos else None, tokens[eos] if add_eos else None)
        stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        ids = {
            "unk_token": meta.get("tokenizer.ggml.unknown_token_id"),
            "pad_token": meta.get("tokenizer.ggml.padding_token_id"),
        }
        extra = {name: tokens[i] for name, i in ids.items() if i is not None}
        source = str(
            getattr(path_or_reader, "path", None)  # a GGUFFile
            or getattr(getattr(path_or_reader, "data", None), "filename", None)  # a gguf.GGUFReader
            or path_or_reader
        )
        template = meta.get("tokenizer.chat_template")
        return cls(
            backend, bos_id=bos, eos_id=eos, stop_ids=stops, chat_template=template, source=source, template_vars=extra
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """From tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json)."""
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        backend = Backend.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        bos, eos = (_token_id(backend, config.get(k)) for k in ("bos_token", "eos_token"))
        _apply_add_flags(backend, config)
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        stops = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        extra = {k: _token_text(config[k]) for k in ("unk_token", "pad_token") if config.get(k) is not None}
        template = _hf_template(path, config)
        return cls(
            backend,
            bos_id=bos,
            eos_id=eos,
            stop_ids=stops,
            chat_template=template,
            source=str(path),
            template_vars=extra,
        )

    # -- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids; BOS iff add_bos and add_special_tokens."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str:
        piece = self.backend.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def is_special(self, i: int) -> bool:
        return int(i) in self._special

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.backend.id_to_token(self.eos_id)

    # -- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages`: the model's own template, else chat_template.PLAIN_TEMPLATE."""
        specials = {**self.template_vars, "bos_token": self.bos_token, "eos_token": self.eos_token}
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, special_tokens=specials, **kwargs
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Render and encode; BOS is prepended only when add_bos and the template did not write it."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        ids = self.encode(text, add_special_tokens=False)
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids = self.encode(text, add_special_tokens=True)
        return ids

    @cached_property
    def digest(self) -> str:
        """sha256 of the tokenizer json (compact; vocab by id, merges by rank) + the chat template (for receipts)."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(b"\0" + (self.chat_template or "").encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, source={self.source!r})"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _token_id(backend: Backend, token: Any) -> int | None:
    text = _token_text(token)
    return None if text is None else backend.token_to_id(text)


def _apply_add_flags(backend: Backend, config: dict) -> None:
    """tokenizer_config's add_bos_token/add_eos_token, when given, override a template post-processor."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    if backend.post_processor is not None and not isinstance(backend.post_processor, processors.TemplateProcessing):
        return  # e.g. a ByteLevel/RoBERTa processor: leave the file's behaviour alone
    bos = _token_text(config.get("bos_token")) if config.get("add_bos_token") else None
    eos = _token_text(config.get("eos_token")) if config.get("add_eos_token") else None
    _set_post_processor(backend, bos, eos)


def _hf_template(path: Path, config: dict) -> str | None:
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


class IncrementalDecoder:
    """Streaming detokenizer: push ids one by one, get text deltas that never split a character.

    Decodes a short window of ids (some already-emitted context plus the new ones) and emits only
    the text past the context, holding back while the window ends in an incomplete UTF-8 sequence
    (a U+FFFD at the end). `flush()` emits whatever is held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: context already emitted
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        context = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(context) :]

    def flush(self) -> str:
        context = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(context) :]
