"""A Backend on llama-cpp-python (llama.cpp): a peer engine for parity checks, benchmarks and repro studies.

llama-cpp-python is an OPTIONAL dependency: it is imported when a LlamaCppBackend is built, never at
module import, and a clear error says how to install it when it is absent.

What is llama.cpp's and what is ditto's here:
- Greedy (temperature 0) is llama.cpp's greedy sampler (argmax of the logits it computed).
- Sampling (temperature > 0) is llama.cpp's own seeded sampler chain (penalties, top-k, typical, top-p,
  min-p, temperature, dist) under ``set_seed(seed)``: NOT ditto's counter-based Gumbel sampling, so the
  same seed gives different samples from ditto's engine.
- Prompts are rendered with ditto's own chat-template renderer (``ditto.loader.tokenizer.Tokenizer``
  built from the same GGUF file), so every backend sees the same prompt text; text is encoded and
  decoded with llama.cpp's tokenizer.
- Requests run one after another (llama.cpp's single sequence, no batching across prompts);
  ``batch_size`` is llama.cpp's ``n_batch``: how many prompt tokens one prefill step takes.
- Quantised GGUF weights run as llama.cpp runs them (e.g. Q4_1 weights times quantised activations).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path

import numpy as np

from ditto.backends.base import params_per_prompt
from ditto.outputs import CompletionOutput, RequestOutput, ScoreOutput
from ditto.sampling import SamplingParams

INSTALL_HINT = (
    "llama-cpp-python is not installed (it is an optional extra). Install it with\n"
    '  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
    "pip install llama-cpp-python"
)


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from exc
    return llama_cpp


def available() -> bool:
    """True when llama-cpp-python can be imported."""
    try:
        _import_llama_cpp()
    except ImportError:
        return False
    return True


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class LlamaCppBackend:
    """Backend protocol on llama-cpp-python for one GGUF file (CPU)."""

    name = "llama_cpp"

    def __init__(
        self, gguf_path: str | os.PathLike, threads: int | None = None, n_ctx: int = 4096, batch_size: int = 512
    ):
        self._lib = _import_llama_cpp()
        self.path = Path(gguf_path)
        if not (self.path.is_file() and self.path.suffix == ".gguf"):
            raise ValueError(f"LlamaCppBackend needs a .gguf file, got {str(self.path)!r}")
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        self.n_ctx, self.n_batch = int(n_ctx), max(1, int(batch_size))
        self.llm = self._make(logits_all=False)
        self._scorer = None  # a second context with logits for every position, built on first score()
        self._digest: str | None = None
        from ditto.loader.tokenizer import Tokenizer

        self.template_tokenizer = Tokenizer.from_gguf(self.path)  # renders chat prompts exactly as ditto does
        self.stop_ids = {int(self.llm.token_eos())} | set(getattr(self.template_tokenizer, "stop_ids", ()) or ())

    def _make(self, logits_all: bool):
        return self._lib.Llama(
            model_path=str(self.path),
            n_ctx=self.n_ctx,
            n_batch=self.n_batch,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=logits_all,
            verbose=False,
        )

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True))

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in self.stop_ids]
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def _ids(self, prompt) -> list[int]:
        return [int(t) for t in prompt] if isinstance(prompt, list) else self.encode(prompt)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, params, *, progress: bool = False) -> list[RequestOutput]:
        plist = params_per_prompt(prompts, params)
        outs = []
        for i, (prompt, sp) in enumerate(zip(prompts, plist)):
            t0 = time.perf_counter()
            ids = self._ids(prompt)
            comps = [self._one(ids, sp, j) for j in range(sp.n)]
            outs.append(
                RequestOutput(
                    request_id=f"llamacpp-{i}",
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=ids,
                    outputs=comps,
                    finished=True,
                    metrics={
                        "seed": sp.seed,
                        "backend": self.name,
                        "sampling": "llama.cpp greedy" if sp.greedy else "llama.cpp sampler chain (not ditto's)",
                        "determinism": "none",
                        "numerics": "gguf (llama.cpp kernels)",
                        "latency_s": time.perf_counter() - t0,
                        "batch_size": 1,
                    },
                )
            )
        return outs

    def _last_logprobs(self) -> np.ndarray | None:
        try:
            ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
            return _log_softmax(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy())
        except Exception:  # pragma: no cover - binding details vary between versions
            return None

    def _one(self, ids: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        if sp.frequency_penalty or sp.presence_penalty:
            pass  # passed through below: llama.cpp has both
        if len(ids) + sp.max_tokens > self.n_ctx:
            raise ValueError(f"prompt ({len(ids)}) + max_tokens ({sp.max_tokens}) exceeds n_ctx={self.n_ctx}")
        self.llm.set_seed((sp.seed + index) % 2**32)
        stops = set() if sp.ignore_eos else set(self.stop_ids)
        stops |= set(sp.stop_token_ids)
        toks: list[int] = []
        lps: list[float] = []
        finish, stop_reason = "length", None
        gen = self.llm.generate(
            ids,
            temp=0.0 if sp.greedy else sp.temperature,
            top_k=1 if sp.greedy else (sp.top_k or 0),
            top_p=sp.top_p,
            min_p=sp.min_p,
            repeat_penalty=sp.repetition_penalty,
            frequency_penalty=sp.frequency_penalty,
            presence_penalty=sp.presence_penalty,
            reset=True,
        )
        for tok in gen:
            tok = int(tok)
            lp = self._last_logprobs()
            toks.append(tok)
            lps.append(float(lp[tok]) if lp is not None else float("nan"))
            if tok in stops and len(toks) >= sp.min_tokens:
                finish, stop_reason = "stop", tok
                break
            if sp.stop:
                text = self.decode(toks)
                hit = [(text.find(s), s) for s in sp.stop if s in text]
                if hit:
                    finish, stop_reason = "stop", min(hit)[1]
                    break
            if len(toks) >= sp.max_tokens:
                break
        gen.close()
        text = self.decode(toks)
        if isinstance(stop_reason, str):
            pos = text.find(stop_reason)
            text = text[: pos + (len(stop_reason) if sp.include_stop_str_in_output else 0)]
        return CompletionOutput(
            index=index, text=text, token_ids=toks, logprobs=lps, finish_reason=finish, stop_reason=stop_reason
        )

    # ------------------------------------------------------------------ scoring
    def score(self, prompt, continuation) -> ScoreOutput:
        p_ids = self._ids(prompt)
        c_ids = [int(t) for t in continuation] if isinstance(continuation, list) else self.encode(continuation, False)
        if not c_ids:
            raise ValueError("empty continuation: nothing to score")
        if self._scorer is None:
            self._scorer = self._make(logits_all=True)
        sc = self._scorer
        sc.reset()
        sc.eval(p_ids + c_ids)
        n = len(p_ids)
        rows = _log_softmax(np.asarray(sc.scores[n - 1 : n - 1 + len(c_ids)]))  # (C, V)
        return ScoreOutput(
            prompt_token_ids=p_ids,
            token_ids=c_ids,
            logprobs=[float(rows[i, t]) for i, t in enumerate(c_ids)],
            top_ids=[int(r.argmax()) for r in rows],
        )

    # ------------------------------------------------------------------ manifest
    def info(self) -> dict:
        if self._digest is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._digest = h.hexdigest()
        return {
            "backend": self.name,
            "model": str(self.path),
            "model_digest": f"sha256:{self._digest}",
            "tokenizer_digest": getattr(self.template_tokenizer, "digest", None),
            "numerics": "gguf weights as stored, llama.cpp CPU kernels (quantised activations for quantised weights)",
            "determinism": "none promised (llama.cpp; single sequence, so batch effects do not arise here)",
            "sampler": "greedy = llama.cpp greedy sampler; temperature > 0 = llama.cpp's seeded sampler chain, "
            "NOT ditto's counter-based Gumbel-max (same seed, different samples)",
            "chat_template": "rendered by ditto.loader.tokenizer (same text as the ditto backend)",
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "batching": "sequential: one request at a time",
            "versions": {
                "llama_cpp_python": getattr(self._lib, "__version__", None),
                "python": platform.python_version(),
            },
            "cpu": platform.processor() or platform.machine(),
        }
