"""A Backend on Hugging Face transformers (AutoModelForCausalLM): the reference peer for evaluation.

Sampling here is transformers' own (softmax + torch.multinomial under ``torch.manual_seed(seed)``),
NOT ditto's counter-based Gumbel sampling: the same seed gives different samples than ditto's
engine, and results can depend on batch composition and left padding. Greedy (temperature 0) is
argmax. Prompts that share identical SamplingParams are batched together (left padding); prompts
with different seeds are generated in separate calls so each seed means one thing.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path

import torch

from ditto.backends.base import params_per_prompt
from ditto.outputs import CompletionOutput, RequestOutput, ScoreOutput
from ditto.sampling import SamplingParams

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class _StopOnText:
    """Stop a row once its generated text (prompt excluded, unlike HF's stop_strings) holds a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, stops, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.width :].tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class TransformersBackend:
    """Backend protocol on transformers. `model_path_or_dir`: an HF folder or a .gguf file (local only)."""

    name = "transformers"

    def __init__(
        self,
        model_path_or_dir: str | os.PathLike,
        dtype: str = "float32",
        batch_size: int = 16,
        device: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.path = Path(model_path_or_dir)
        self.dtype = dtype
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        kwargs: dict = {"local_files_only": True}
        if self.path.is_file() and self.path.suffix == ".gguf":
            folder, kwargs["gguf_file"] = self.path.parent, self.path.name
            self._weight_files = [self.path]
        else:
            folder = self.path
            self._weight_files = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=_DTYPES[dtype], **kwargs)
        self.model.to(self.device).eval()
        self._folder = folder
        self._digest: str | None = None

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")

    def _ids(self, prompt) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.encode(prompt)

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, params, *, progress: bool = False) -> list[RequestOutput]:
        plist = params_per_prompt(prompts, params)
        for p in plist:
            if p.frequency_penalty or p.presence_penalty:
                raise ValueError("TransformersBackend does not support frequency/presence penalties")
        results: list[RequestOutput | None] = [None] * len(prompts)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(plist):
            rec = p.record()
            if p.greedy:  # the seed cannot matter, so greedy prompts batch together
                rec.pop("seed")
            groups.setdefault(repr(sorted(rec.items())), []).append(i)
        for idxs in groups.values():
            sp = plist[idxs[0]]
            per_call = max(1, self.batch_size // sp.n)
            for start in range(0, len(idxs), per_call):
                chunk = idxs[start : start + per_call]
                outs = self._generate_batch([self._ids(prompts[i]) for i in chunk], sp)
                for i, out in zip(chunk, outs):
                    out.prompt = prompts[i] if isinstance(prompts[i], str) else None
                    results[i] = out
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, batch_ids: list[list[int]], sp: SamplingParams) -> list[RequestOutput]:
        from transformers import GenerationConfig

        t0 = time.perf_counter()
        pad = self.tokenizer.pad_token_id
        width = max(len(x) for x in batch_ids)
        input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for r, ids in enumerate(batch_ids):
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[r, width - len(ids) :] = 1
        eos = [] if sp.ignore_eos else self._eos_ids()
        eos = eos + [t for t in sp.stop_token_ids if t not in eos]
        gc = GenerationConfig(
            max_new_tokens=sp.max_tokens,
            min_new_tokens=sp.min_tokens or None,
            do_sample=not sp.greedy,
            temperature=sp.temperature if not sp.greedy else None,
            top_k=sp.top_k if (sp.top_k and not sp.greedy) else None,
            top_p=sp.top_p if (sp.top_p < 1.0 and not sp.greedy) else None,
            min_p=sp.min_p if (sp.min_p and not sp.greedy) else None,
            repetition_penalty=sp.repetition_penalty if sp.repetition_penalty != 1.0 else None,
            num_return_sequences=sp.n,
            eos_token_id=eos or None,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
        )
        torch.manual_seed(sp.seed)
        kwargs = {}
        if sp.stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnText(self.tokenizer, sp.stop, width)])
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), generation_config=gc, **kwargs
        )
        seqs = out.sequences[:, width:].cpu()
        logp = torch.stack([lg.float().log_softmax(-1) for lg in out.logits], dim=1).cpu()  # (B*n, T, V)
        elapsed = time.perf_counter() - t0
        results = []
        for r, ids in enumerate(batch_ids):
            comps = []
            for j in range(sp.n):
                row = r * sp.n + j
                toks = seqs[row].tolist()
                comps.append(self._completion(j, toks, logp[row], sp, set(eos)))
            results.append(
                RequestOutput(
                    request_id=f"hf-{r}",
                    prompt=None,
                    prompt_token_ids=ids,
                    outputs=comps,
                    finished=True,
                    metrics={
                        "seed": sp.seed,
                        "backend": self.name,
                        "sampling": "hf-multinomial",
                        "determinism": "none",
                        "numerics": self.dtype,
                        "batch_seconds": elapsed,
                        "batch_size": len(batch_ids),
                    },
                )
            )
        return results

    def _completion(
        self, index: int, toks: list[int], logp: torch.Tensor, sp: SamplingParams, eos: set[int]
    ) -> CompletionOutput:
        finish, stop_reason = "length", None
        cut = len(toks)
        for t, tok in enumerate(toks):
            if tok in eos:
                cut, finish, stop_reason = t, "stop", tok
                break
        toks = toks[:cut]
        text = self.tokenizer.decode(toks, skip_special_tokens=sp.skip_special_tokens)
        if sp.stop:
            hits = [(text.find(s), s) for s in sp.stop if s in text]
            if hits:
                pos, s = min(hits)
                end = pos + len(s) if sp.include_stop_str_in_output else pos
                text = text[:end]
                finish, stop_reason = "stop", s
                # keep the shortest token prefix whose text reaches the stop string
                for k in range(1, len(toks) + 1):
                    if s in self.tokenizer.decode(toks[:k], skip_special_tokens=sp.skip_special_tokens):
                        toks = toks[:k]
                        break
        lps = [float(logp[t, tok]) for t, tok in enumerate(toks)]
        top = None
        if sp.logprobs:
            top = []
            for t in range(len(toks)):
                v, i = torch.topk(logp[t], sp.logprobs)
                top.append({int(a): float(b) for a, b in zip(i, v)})
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=toks,
            logprobs=lps,
            finish_reason=finish,
            top_logprobs=top,
            stop_reason=stop_reason,
        )

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, prompt, continuation) -> ScoreOutput:
        p_ids = self._ids(prompt)
        c_ids = list(continuation) if isinstance(continuation, list) else self.encode(continuation, False)
        ids = torch.tensor([p_ids + c_ids], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids).logits[0].float().log_softmax(-1).cpu()
        n = len(p_ids)
        lps = [float(logits[n - 1 + i, t]) for i, t in enumerate(c_ids)]
        top = [int(logits[n - 1 + i].argmax()) for i in range(len(c_ids))]
        return ScoreOutput(prompt_token_ids=p_ids, token_ids=c_ids, logprobs=lps, top_ids=top)

    # ------------------------------------------------------------------ manifest
    def info(self) -> dict:
        import transformers

        if self._digest is None:
            self._digest = _digest_files(self._weight_files) if self._weight_files else None
        tok_files = [p for p in self._folder.iterdir() if p.name.startswith("tokenizer") or p.suffix == ".gguf"]
        tmpl = getattr(self.tokenizer, "chat_template", None) or ""
        return {
            "backend": self.name,
            "model": str(self.path),
            "model_digest": f"sha256:{self._digest}" if self._digest else None,
            "model_class": type(self.model).__name__,
            "tokenizer": {
                "class": type(self.tokenizer).__name__,
                "vocab_size": len(self.tokenizer),
                "digest": f"sha256:{_digest_files(tok_files)}" if tok_files else None,
                "chat_template_sha256": hashlib.sha256(tmpl.encode()).hexdigest() if tmpl else None,
            },
            "numerics": {"dtype": self.dtype, "device": str(self.device)},
            "determinism": "none (transformers' multinomial sampling under torch.manual_seed(seed); NOT ditto's "
            "counter-based Gumbel sampling; outputs may depend on batch composition and padding)",
            "sampling": "hf-multinomial",
            "batch_size": self.batch_size,
            "versions": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
