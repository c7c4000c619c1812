"""Tokenizer and chat template: parity with transformers on the bundled models, HF dirs, streaming, errors.

The reference is transformers' GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
Building it takes transformers ~20 s for gemma, so it is built once, saved with `save_pretrained` under
the ditto cache (keyed by transformers version and GGUF size/mtime) and reloaded from there on later
runs (a saved transformers tokenizer gives the same ids).

One known, deliberate difference: for SmolLM2 (`tokenizer.ggml.pre = smollm`) transformers falls back
to the plain GPT-2 split, while llama.cpp and SmolLM2's own tokenizer.json first split every digit
off (`\\p{N}`). We follow the latter, so SmolLM2 is compared with the transformers tokenizer given
that digit split, and with plain transformers on text without digits.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditto.loader.chat_template import PLAIN_TEMPLATE, ChatTemplateError, render_chat_template
from ditto.loader.tokenizer import IncrementalDecoder, Tokenizer, merges_from_ranks, read_gguf_metadata

# fmt: off
HAND = [
    "", " ", "  ", "\n", "\t", "\r\n", "Hello world", " Hello world", "  leading two", "trailing  ",
    "0", "7", "42", "123456789", "3.14159", "-0.5e-10", "1,234,567", "12,345.67", "1 000 000", "2024-01-31",
    "9999999999999999999999", "The year 1999 had 365 days.", "x1y22z333", "½ ² ³ ١٢٣ ١,٢٣٤", "  1", "\n\n42",
    "你好，世界！", "日本語のテキストです。", "한국어 문장입니다", "مرحبا بالعالم", "שלום עולם", "Ελληνικά",
    "café naïve résumé", "e\u0301 combining", "Zürich Straße", "Привет, мир!",
    "😀", "👍🏽", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "🇫🇷🇯🇵", "I ❤️ NY", "emoji😀inside",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = i; }", '<div class="a">hi</div>',
    "SELECT * FROM t WHERE id = 3;", "    four spaces", "\t\ttabs\tand\nnewlines\n\n\n", "a\u00a0b\u3000c",
    "multiple     spaces   here", "line1\r\nline2\rline3", "it's don't we'll I'M", "https://example.com/a?b=1&c=2",
    "$x^2 + y^2 = z^2$", "\\frac{1}{2}", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "<bos>hello<eos>",
    "<start_of_turn>user\nhi<end_of_turn>\n", "<unk>", "<pad><mask>", "[multimodal]", "<|im_start|><|im_start|>",
    "text<|im_end|>more", "\ufffd", "zero\u200bwidth", "!!!???...", "—–-", "«quotes» “smart”", "<|im_start", "<eos",
]
POOLS = {
    "ascii": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "digits": "0123456789",
    "punct": ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "ws": [" ", " ", "  ", "\t", "\n", "\n\n", "\r\n", "   ", "\u00a0"],
    "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
    "accent": "éèêëàâäôöûüçñåøæœß",
    "rtl": "مرحبابالعالمשלוםעולם",
    "emoji": ["😀", "🎉", "👍🏽", "👨‍👩‍👧", "❤️", "🏳️‍🌈", "🇺🇸", "🤖", "✨"],
}
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
# fmt: on
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hello 👋"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Écris « bonjour » 3 fois.\n\nMerci"},
    ],
    [
        {"role": "system", "content": "You are a math tutor."},
        {"role": "user", "content": "Solve x^2 = 4"},
        {"role": "assistant", "content": "x = 2 or x = -2"},
        {"role": "user", "content": "并且 x^3 = 8?"},
    ],
]


def random_corpus(n: int, seed: int = 0) -> list[str]:
    """Mixed scripts, whitespace runs, emoji, digits and special-token strings; plus formatted numbers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            pool = POOLS[rng.choice(list(POOLS))]
            parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
            if rng.random() < 0.05:
                parts.append(rng.choice(SPECIALS))
        out.append("".join(parts))
    for _ in range(n // 4):
        number = rng.randint(0, 10 ** rng.randint(1, 25))
        text = f"{number:,}" if rng.random() < 0.5 else str(number)
        out.append(rng.choice(["", " ", "  ", "x", "$", "\n"]) + text)
    return out


def chat_texts(tok: Tokenizer) -> list[str]:
    return [tok.apply_chat_template(c, add_generation_prompt=g) for c in CONVERSATIONS for g in (True, False)]


def has_number(text: str) -> bool:
    return any(unicodedata.category(c).startswith("N") for c in text)


# ---------------------------------------------------------------- fixtures (built once per module)
@pytest.fixture(scope="module")
def paths():
    from ditto.loader.registry import resolve_model

    return {name: resolve_model(name) for name in ("smollm2-135m-instruct", "gemma3-270m")}


@pytest.fixture(scope="module")
def smol(paths) -> Tokenizer:
    return Tokenizer.from_gguf(paths["smollm2-135m-instruct"])


@pytest.fixture(scope="module")
def gemma(paths) -> Tokenizer:
    return Tokenizer.from_gguf(paths["gemma3-270m"])


def _reference(path: Path):
    """transformers' tokenizer for a GGUF file, and the directory it is saved in."""
    transformers = pytest.importorskip("transformers")
    from ditto.loader.registry import cache_dir

    stat = path.stat()
    saved = (
        cache_dir()
        / "test-references"
        / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"
    )
    if (saved / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(str(saved)), saved
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    staging = Path(tempfile.mkdtemp(dir=saved.parent.parent if saved.parent.exists() else None))
    ref.save_pretrained(staging)
    saved.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, saved)
    except OSError:  # another process saved it first
        shutil.rmtree(staging, ignore_errors=True)
    return ref, saved


@pytest.fixture(scope="module")
def smol_saved(paths):
    return _reference(paths["smollm2-135m-instruct"])


@pytest.fixture(scope="module")
def smol_ref(smol_saved):
    return smol_saved[0]


@pytest.fixture(scope="module")
def smol_ref_digits(smol_ref):
    """transformers' SmolLM2 tokenizer with the digit split llama.cpp and SmolLM2's tokenizer.json use."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(smol_ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@pytest.fixture(scope="module")
def gemma_saved(paths):
    return _reference(paths["gemma3-270m"])


@pytest.fixture(scope="module")
def gemma_ref(gemma_saved):
    return gemma_saved[0]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return HAND + random_corpus(240, seed=1)


# ---------------------------------------------------------------- parity with transformers
slow = pytest.mark.slow  # uses the bundled models


@slow
def test_smollm_ids_match_transformers(smol, smol_ref, smol_ref_digits, corpus):
    texts = corpus + chat_texts(smol)
    assert len(texts) >= 200
    for text in texts:
        ids = smol.encode(text)
        assert ids == smol_ref_digits.encode(text).ids, text
        if not has_number(text):
            assert ids == smol_ref.encode(text), text
    # the gap is real and only about digits: plain transformers keeps " 1" / "\n\n4" together
    assert smol.encode("  1") != smol_ref.encode("  1")


@slow
def test_gemma_ids_match_transformers(gemma, gemma_ref, corpus):
    texts = corpus + [gemma.apply_chat_template(c) for c in CONVERSATIONS]
    for text in texts:
        assert gemma.encode(text) == gemma_ref.encode(text), text
        assert gemma.encode(text, add_special_tokens=False) == gemma_ref.encode(text, add_special_tokens=False)


@slow
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_decode_round_trips_and_matches_transformers(name, request, corpus):
    tok = request.getfixturevalue(name)
    ref = request.getfixturevalue(f"{name}_ref")
    for text in corpus:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True), text


@slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_random_text_parity(gemma, gemma_ref, smol, smol_ref_digits, text):
    assert gemma.encode(text) == gemma_ref.encode(text)
    assert smol.encode(text) == smol_ref_digits.encode(text).ids
    if not set(text.encode()) & SMOL_MISSING_BYTES:
        assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


# SmolLM2's byte-level vocabulary has no token for these bytes (rare controls, planes 4-11, invalid UTF-8):
# text containing them loses them on encode, in transformers as here.
SMOL_MISSING_BYTES = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}


@slow
def test_smollm_vocab_gaps_drop_bytes_like_transformers(smol, smol_ref):
    from ditto.loader.tokenizer import _bytes_to_unicode

    spelling = _bytes_to_unicode()
    assert {b for b in range(256) if smol.backend.token_to_id(spelling[b]) is None} == SMOL_MISSING_BYTES
    assert smol.encode("a\x04b\U00040000") == smol_ref.encode("a\x04b\U00040000") == [81, 82, 218, 218, 218]


@slow
def test_special_tokens_and_stops(smol, gemma):
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.add_bos) == (49152, 1, 2, False)
    assert (gemma.vocab_size, gemma.bos_id, gemma.eos_id, gemma.add_bos) == (262144, 2, 1, True)
    assert smol.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert gemma.stop_ids == {1, 106}  # <eos>, <end_of_turn>
    assert smol.encode("<|im_start|>user") == [1, 4093]
    assert gemma.encode("<start_of_turn>user", add_special_tokens=False) == [105, 2364]
    assert gemma.encode("hi")[0] == 2 and gemma.encode("hi", add_special_tokens=False)[0] != 2
    assert smol.is_special(2) and not smol.is_special(4093) and gemma.is_special(106)
    assert smol.id_to_piece(4093) == "user" and gemma.id_to_piece(138) == "▁▁"
    assert (
        smol.decode([1, 4093, 2]) == "user" and smol.decode([1, 4093], skip_special_tokens=False) == "<|im_start|>user"
    )
    with pytest.raises(IndexError):
        smol.id_to_piece(10**6)


@slow
def test_digest_is_stable_and_distinct(paths, smol):
    again = Tokenizer.from_gguf(paths["smollm2-135m-instruct"])
    assert again.digest == smol.digest and len(smol.digest) == 64
    again.chat_template = None
    del again.digest  # cached_property
    assert again.digest != smol.digest


@slow
def test_gguf_reader_gives_the_same_tokenizer(paths, tmp_path):
    """A gguf.GGUFReader (what the model loader holds) and a path build the same tokenizer.

    GGUFReader parses a full vocabulary slowly, so this uses SmolLM2's first 3000 tokens.
    """
    import gguf

    meta = {k: v for k, v in read_gguf_metadata(paths["smollm2-135m-instruct"]).items() if k.startswith("tokenizer.")}
    n = 3000
    kept = set(meta["tokenizer.ggml.tokens"][:n])
    meta["tokenizer.ggml.merges"] = [m for m in meta["tokenizer.ggml.merges"] if m.replace(" ", "") in kept]
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:n]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:n]
    path = _write_gguf(tmp_path / "small.gguf", **meta)
    from_path, from_reader = Tokenizer.from_gguf(path), Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    assert from_path.digest == from_reader.digest and from_path.vocab_size == n
    for text in HAND:
        assert from_reader.encode(text) == from_path.encode(text)
    assert from_reader.encode("<|im_start|> 12")[:4] == [1, 216, 33, 34]
    assert from_reader.chat_template == meta["tokenizer.chat_template"] and from_reader.stop_ids == {0, 2}


@slow
def test_generic_sentencepiece_matches_transformers(paths, tmp_path, corpus):
    """`llama` vocabulary outside the Gemma family: merges by score, prefix space ('▁' prepended), Strip decoder.

    Built from a 25k-token slice of gemma's vocabulary (its top 6000 tokens and every single character),
    declared as architecture `llama`, so transformers builds it with its LlamaTokenizer.
    """
    transformers = pytest.importorskip("transformers")
    meta = read_gguf_metadata(paths["gemma3-270m"])
    keep = [i for i, t in enumerate(meta["tokenizer.ggml.tokens"]) if i < 6000 or len(t) == 1]
    arrays = ("tokens", "scores", "token_type")
    fields = {f"tokenizer.ggml.{k}": [meta[f"tokenizer.ggml.{k}"][i] for i in keep] for k in arrays}
    for k in ("model", "bos_token_id", "eos_token_id", "unknown_token_id"):
        fields[f"tokenizer.ggml.{k}"] = meta[f"tokenizer.ggml.{k}"]
    path = _write_gguf(tmp_path / "spm.gguf", **fields)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tok = Tokenizer.from_gguf(path)
    assert tok.add_bos and tok.encode("hi") == tok.encode(" hi") == [2, tok.backend.token_to_id("▁hi")]
    for text in corpus:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        stream = IncrementalDecoder(tok)
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(ids)


# ---------------------------------------------------------------- chat templates
@slow
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm_chat_template_matches_transformers(smol, smol_ref, conversation, add_generation_prompt):
    ours = smol.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    ref = smol_ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    assert smol.encode_chat(conversation, add_generation_prompt) == smol_ref.encode(ref)


@slow
def test_gemma_has_no_template_and_uses_plain_fallback(gemma):
    assert gemma.chat_template is None
    text = gemma.apply_chat_template(CONVERSATIONS[3])
    assert text == (
        "You are a math tutor.\n\nUser: Solve x^2 = 4\nAssistant: x = 2 or x = -2\nUser: 并且 x^3 = 8?\nAssistant:"
    )
    ids = gemma.encode_chat(CONVERSATIONS[0])
    assert ids[:2] != [2, 2] and ids[0] == 2 and ids == gemma.encode("User: Hi\nAssistant:")


@slow
def test_template_that_writes_bos_gets_one_bos(gemma):
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}{{ unk_token }}"
    )
    tok = Tokenizer(gemma.backend, bos_id=2, eos_id=1, chat_template=template, template_vars={"unk_token": "<unk>"})
    text = tok.apply_chat_template(CONVERSATIONS[0])
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n<unk>"
    ids = tok.encode_chat(CONVERSATIONS[0])
    assert ids[:3] == [2, 105, 2364] and ids.count(2) == 1 and ids[-1] == 3
    assert tok.stop_ids == {1, 106}


# ---------------------------------------------------------------- HF directories
@slow
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_from_hf_dir_matches_gguf(name, request, corpus):
    tok = request.getfixturevalue(name)
    ref, saved = request.getfixturevalue(f"{name}_saved")  # transformers' save_pretrained output
    hf = Tokenizer.from_hf_dir(saved)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.add_bos) == (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos)
    assert hf.stop_ids == tok.stop_ids and hf.chat_template == tok.chat_template
    for text in corpus[:150]:
        assert hf.encode(text) == ref.encode(text), text
    for conversation in CONVERSATIONS:
        assert hf.apply_chat_template(conversation) == tok.apply_chat_template(conversation)


@slow
def test_from_hf_dir_reads_config_and_generation_config(smol_ref, tmp_path):
    import json

    smol_ref.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(chat_template="{{ bos_token }}{{ messages[0]['content'] }}", add_bos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos and tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"
    assert tok.stop_ids == {0, 2, 5}
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


# ---------------------------------------------------------------- streaming
STREAM_TEXTS = ["👨‍👩‍👧‍👦 family 🏳️‍🌈!", "你好，世界！日本語のテキスト", "🇫🇷🇯🇵 café 😀😀 한국어 ١٢٣", "a\n\n👍🏽\tb  c"]


@slow
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_incremental_decoder_matches_full_decode(name, request):
    tok = request.getfixturevalue(name)
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        stream = IncrementalDecoder(tok)
        deltas = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(deltas) == tok.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)


@slow
def test_incremental_decoder_holds_partial_bytes(gemma):
    ids = gemma.encode("😀", add_special_tokens=False)  # byte fallback: 4 byte tokens
    assert len(ids) in (1, 4)
    raw = [gemma.backend.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    stream = IncrementalDecoder(gemma)
    assert [stream.push(i) for i in raw] == ["", "", "", "😀"]
    stream = IncrementalDecoder(gemma)
    assert stream.push(raw[0]) == "" and stream.flush() == "\ufffd"


# ---------------------------------------------------------------- errors and small pieces
def _write_gguf(path: Path, **fields) -> Path:
    """A small GGUF with the given metadata (names with dots as keyword arguments via **dict)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("model", ["rwkv", "bert"])
def test_unknown_tokenizer_model_is_a_clear_error(tmp_path, model):
    path = _write_gguf(tmp_path / "t.gguf", **{"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a", "b"]})
    assert read_gguf_metadata(path)["tokenizer.ggml.tokens"] == ["a", "b"]
    with pytest.raises(ValueError, match=model):
        Tokenizer.from_gguf(path)
    import gguf

    with pytest.raises(ValueError, match=model):
        Tokenizer.from_gguf(gguf.GGUFReader(str(path)))


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path):
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "martian", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ValueError, match="martian"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", **fields))


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        Tokenizer.from_gguf(tmp_path / "x.gguf")


def test_merges_from_ranks_best_first():
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc"])}
    rank = {t: -i for t, i in vocab.items()}
    assert merges_from_ranks(vocab, rank) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_chat_template_errors_and_globals():
    with pytest.raises(ChatTemplateError, match="no system"):
        render_chat_template("{{ raise_exception('no system') }}", [])
    with pytest.raises(ChatTemplateError, match="role"):
        render_chat_template(None, [{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat_template("{% for %}", [])
    text = render_chat_template(
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}", [{"role": "u", "content": "é"}]
    )
    assert text == '[{"role": "u", "content": "é"}]|4'
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat_template(PLAIN_TEMPLATE, [{"role": "user", "content": "ab"}]) == render_chat_template(
        None, parts
    )
